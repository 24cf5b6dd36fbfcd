// Talking to the ModelPress API. The key lives in sessionStorage only (gone when the tab closes)
// and goes out as `Authorization: Bearer <key>` on every /v1 call.

const KEY_STORAGE = "modelpress.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** An API error carrying the server's problem+json `code` and human `message`. */
export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

// Anyone may listen for a 401 (the router sends the user back to sign in).
export const unauthorized = new EventTarget();

function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function problemFrom(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    /* not JSON */
  }
  const message = (body && (body.message || body.detail || body.title)) || `${resp.status} ${resp.statusText}`;
  const code = (body && body.code) || "http_error";
  if (resp.status === 401) unauthorized.dispatchEvent(new CustomEvent("unauthorized", { detail: message }));
  return new ApiError(resp.status, code, message, body);
}

/** fetch a JSON resource; `etag` support answers {notModified: true} on 304. */
export async function api(path, { method = "GET", body, headers = {}, etag, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal, cache: "no-store" };
  if (etag) init.headers["If-None-Match"] = etag;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 304) return { notModified: true, etag };
  if (!resp.ok) throw await problemFrom(resp);
  if (resp.status === 204) return null;
  const data = await resp.json();
  if (etag !== undefined) return { data, etag: resp.headers.get("ETag") };
  return data;
}

/** Every page of a cursor-paged list, up to `maxItems`. */
export async function allPages(path, { maxItems = 2000, limit = 200 } = {}) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const url = `${path}${sep}limit=${limit}` + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : "");
    const page = await api(url);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < maxItems);
  return items;
}

/**
 * Upload a file as multipart (field `file`) with XMLHttpRequest, whose upload events give progress
 * (fetch has none for request bodies). onProgress(loaded, total).
 */
export function upload(path, file, { name, onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    const key = getKey();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (ev) => {
      if (onProgress) onProgress(ev.loaded, ev.lengthComputable ? ev.total : file.size);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300) {
        if (onProgress) onProgress(file.size, file.size);
        resolve(body);
      } else {
        if (xhr.status === 401) unauthorized.dispatchEvent(new CustomEvent("unauthorized"));
        const message = (body && (body.message || body.detail)) || `${xhr.status} ${xhr.statusText}`;
        reject(new ApiError(xhr.status, (body && body.code) || "http_error", message, body));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network_error", "the upload failed: network error")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "the upload was cancelled")));
    const form = new FormData();
    form.append("file", file, file.name);
    if (name) form.append("name", name);
    xhr.send(form);
  });
}

async function sha256Hex(blob) {
  if (!(globalThis.crypto && crypto.subtle)) return null; // only in secure contexts (https, localhost)
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Download a protected file: a plain link cannot send the Authorization header, so fetch it as a
 * blob and save it through an object URL. Answers the server's X-Content-SHA256 and the sha256
 * computed here (null where the browser gives no crypto.subtle).
 */
export async function download(path, filename) {
  const resp = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (!resp.ok) throw await problemFrom(resp);
  const blob = await resp.blob();
  const expected = resp.headers.get("X-Content-SHA256");
  const actual = await sha256Hex(blob);
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return { expected, actual, size: blob.size };
}

/**
 * Follow a job's server-sent events with fetch (EventSource cannot send a header). Calls
 * onEvent({id, event, data}) per event; resolves when the stream ends. Rejects with
 * {unsupported: true} when the server answers something other than text/event-stream.
 */
export async function streamEvents(path, { onEvent, signal, lastEventId } = {}) {
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
  const resp = await fetch(path, { headers, signal, cache: "no-store" });
  if (!resp.ok) throw await problemFrom(resp);
  const type = resp.headers.get("Content-Type") || "";
  if (!type.startsWith("text/event-stream") || !resp.body) {
    resp.body && resp.body.cancel();
    throw Object.assign(new Error("no event stream"), { unsupported: true });
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const event = { id: null, event: "message", data: "" };
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") data.push(val);
        else if (field === "id") event.id = val;
        else if (field === "event") event.event = val;
      }
      if (!data.length && event.id === null) continue;
      event.data = data.join("\n");
      try {
        event.json = JSON.parse(event.data);
      } catch {
        event.json = null;
      }
      onEvent(event);
    }
  }
}
