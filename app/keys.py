"""`python -m app.keys`: create, list and revoke API keys in the keys file (app/auth.py).

    python -m app.keys create --tenant team-a --scopes read,submit   # prints the key, once
    python -m app.keys list
    python -m app.keys revoke <key id>

The file is ATTR_API_KEYS_FILE (or --file). Rotation: create a new key for the tenant, hand it out,
revoke the old one; a running API reads the file again when it changes.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

from contract.settings import Settings

from .auth import SCOPES, digest, new_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description=__doc__)
    parser.add_argument("--file", type=Path, default=None, help="default: ATTR_API_KEYS_FILE")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scopes", default="read,submit", help=f"comma-separated, of {', '.join(SCOPES)}")
    sub.add_parser("list")
    revoke = sub.add_parser("revoke")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    path = args.file or Settings().api_keys_file
    if path is None:
        print("error: no keys file: set ATTR_API_KEYS_FILE or pass --file", file=sys.stderr)  # noqa: T201
        return 2
    keys = tomllib.loads(path.read_text()).get("keys", {}) if path.exists() else {}
    if args.command == "create":
        scopes = [s for s in args.scopes.split(",") if s]
        if not scopes or set(scopes) - set(SCOPES):
            print(f"error: scopes must be some of {', '.join(SCOPES)}", file=sys.stderr)  # noqa: T201
            return 2
        key_id, secret, key = new_key()
        keys[key_id] = {
            "tenant": args.tenant,
            "scopes": scopes,
            "sha256": digest(secret),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        print(key)  # noqa: T201 (the only time the key is shown)
    elif args.command == "list":
        for key_id, entry in sorted(keys.items()):
            print(f"{key_id}  {entry['tenant']:24} {','.join(entry['scopes']):20} {entry.get('created', '')}")  # noqa: T201
        return 0
    elif keys.pop(args.key_id, None) is None:
        print(f"error: no key {args.key_id!r}", file=sys.stderr)  # noqa: T201
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps({"keys": keys}))
    tmp.chmod(0o600)
    tmp.replace(path)  # atomic: a running API never reads half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
