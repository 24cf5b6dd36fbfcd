"""Text a database cannot store: NUL and lone surrogates (PostgreSQL refuses them in text and JSONB)."""
from __future__ import annotations

import re

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
