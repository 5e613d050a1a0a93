"""One line for any exception, for error rows and messages (one home for error shortening).

``<code> <message>`` for botocore errors (the S3 error code says most), else the first line of the
exception's message with its whitespace collapsed; at most ``limit`` characters, and anything
that looks like a credential (signatures, session tokens, access key ids) removed.
"""

from __future__ import annotations

import re

_SECRET = re.compile(r"(Credential=|Signature=|X-Amz-Security-Token=|AKIA|ASIA)[A-Za-z0-9/+=%_-]*")


def short_error(e: BaseException, limit: int = 300) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and resp.get("Error") is not None:
        err = resp.get("Error") or {}
        code = err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or type(e).__name__
        text = f"{code} {err.get('Message') or ''}"
    else:
        text = next((line for line in str(e).splitlines() if line.strip()), "")
    text = " ".join(text.split()) or type(e).__name__
    return _SECRET.sub(r"\1<redacted>", text)[:limit]
