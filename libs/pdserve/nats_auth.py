"""Least privilege on NATS: one identity per role, each allowed only the subjects its role needs.

Roles: router, prefill, decode, broker, and observer (for `nats sub 'pdserve.>'`, `pdserve status` and
dashboards: it sees lifecycle events, never prompts, tokens or transfer tokens). `pdserve up` gives its own
nats-server these identities with fresh passwords; `pdserve nats-config` writes the same for a NATS that users
run themselves. What each role may do, and why:

- Prompts travel only on prefill/decode request subjects (router -> workers), tokens only on stream subjects
  (decode -> router), transfer tokens only in the prefill worker's reply to the router and in the decode
  request: no other role can read them.
- Replies go to a per-identity inbox (`_INBOX_<user>`): a role may read its own replies only; the serving roles
  answer through NATS' `allow_responses` (they may publish to the reply subject of a request they received,
  nothing more).
- Heartbeats and goodbyes are published under the sender's own role; receivers drop one whose message does not
  match its subject (a prefill identity cannot say goodbye for a decode worker).
- The observer may subscribe to `pdserve.>`: the server withholds from it every private subject (NATS applies
  a subscription's deny list when it delivers to a wildcard subscription).

A role is a trust boundary between roles, not within one: every prefill worker holds the prefill identity.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

import orjson

from pdserve import subjects

ROLES = ("router", "prefill", "decode", "broker", "observer")
USER_PREFIX = "pdserve-"
_ANY = "*"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    subscribe_deny: tuple[str, ...] = ()
    allow_responses: bool = False


def inbox_prefix(user: str | None) -> str:
    """Where replies to a connection's requests arrive: per identity, so no other role can read them."""
    if not user:
        return "_INBOX"
    return "_INBOX_" + re.sub(r"[^A-Za-z0-9_-]", "_", user)


def user_name(role: str) -> str:
    return USER_PREFIX + role


# Subjects that carry prompts, tokens, transfer tokens, prompt block hashes, or that grant work: never shown
# to the observer.
PRIVATE_SUBJECTS = (
    subjects.prefill_request(_ANY),
    subjects.prefix_lease(_ANY),
    subjects.kv_release(_ANY),
    subjects.decode_request(_ANY),
    f"{subjects.PREFIX}.stream.>",
    subjects.KV_LOOKUP,
    f"{subjects.PREFIX}.kv.events.>",
)


def permissions(role: str) -> Permissions:
    """The subjects `role` may publish and subscribe to (its own reply inbox included)."""
    inbox = inbox_prefix(user_name(role)) + ".>"
    heartbeat, goodbye = subjects.heartbeat(role, _ANY), subjects.goodbye(role, _ANY)
    if role == "router":
        return Permissions(
            publish=(subjects.prefill_request(_ANY), subjects.prefix_lease(_ANY), subjects.decode_request(_ANY),
                     subjects.CANCEL, subjects.KV_LOOKUP),
            subscribe=(subjects.HEARTBEAT_ALL, subjects.GOODBYE_ALL, subjects.token_streams(_ANY), inbox))
    if role == "prefill":
        return Permissions(
            # kv_release: a prefill worker that pulled a prompt's leading blocks from a peer lets it free them
            publish=(heartbeat, goodbye, subjects.kv_events(_ANY), subjects.KV_HELD, subjects.kv_release(_ANY)),
            subscribe=(subjects.prefill_request(_ANY), subjects.prefix_lease(_ANY), subjects.kv_release(_ANY),
                       subjects.CANCEL,
                       subjects.KV_RESYNC, subjects.worker_stats(_ANY), inbox),
            allow_responses=True)
    if role == "decode":
        return Permissions(
            publish=(heartbeat, goodbye, subjects.kv_events(_ANY), subjects.token_streams(_ANY),
                     subjects.kv_release(_ANY), subjects.KV_TRANSFER_DONE),
            subscribe=(subjects.decode_request(_ANY), subjects.CANCEL, subjects.KV_RESYNC,
                       subjects.worker_stats(_ANY), inbox),
            allow_responses=True)
    if role == "broker":
        return Permissions(
            publish=(heartbeat, goodbye, subjects.KV_RESYNC),
            subscribe=(subjects.HEARTBEAT_ALL, subjects.GOODBYE_ALL, subjects.KV_EVENTS_ALL, subjects.KV_HELD,
                       subjects.KV_TRANSFER_DONE, subjects.KV_LOOKUP, inbox),
            allow_responses=True)
    if role == "observer":
        return Permissions(publish=(subjects.worker_stats(_ANY),),
                           subscribe=(f"{subjects.PREFIX}.>", inbox), subscribe_deny=PRIVATE_SUBJECTS)
    raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


@dataclass(frozen=True)
class Credentials:
    """One role's NATS identity."""

    role: str
    user: str
    password: str

    def file_text(self) -> str:
        """An env file: `set -a; . FILE`, compose's env_file, or --nats-credentials-file FILE all read it."""
        return (f"# pdserve NATS identity of role {self.role} (keep this file private)\n"
                f"PDSERVE_NATS_USER={self.user}\nPDSERVE_NATS_PASSWORD={self.password}\n")


def generate() -> dict[str, Credentials]:
    """Fresh credentials for every role."""
    return {role: Credentials(role, user_name(role), secrets.token_urlsafe(24)) for role in ROLES}


def authorization_block(credentials: dict[str, Credentials]) -> str:
    """nats-server configuration: an `authorization` block with one user per role and its permissions.
    JSON strings are valid quoted strings in nats-server's configuration format."""
    q = lambda value: orjson.dumps(value).decode()  # noqa: E731
    users = []
    for role, cred in credentials.items():
        p = permissions(role)
        subscribe = f"allow: {q(list(p.subscribe))}" + (f", deny: {q(list(p.subscribe_deny))}" if p.subscribe_deny else "")
        users.append(f"    {{user: {q(cred.user)}, password: {q(cred.password)}, permissions: {{"
                     f"publish: {{allow: {q(list(p.publish))}}}, subscribe: {{{subscribe}}}"
                     + (", allow_responses: true" if p.allow_responses else "") + "}}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def write_private(path: str, text: str) -> None:
    """Write a file only this user can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode applies to new files only


def credentials_path(directory: str, role: str) -> str:
    return os.path.join(directory, f"{role}.env")


def write_credentials(directory: str, credentials: dict[str, Credentials]) -> None:
    """One env file per role in `directory` (made private)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for role, cred in credentials.items():
        write_private(credentials_path(directory, role), cred.file_text())


class CredentialsFileError(ValueError):
    pass


def read_credentials_file(path: str) -> tuple[str, str]:
    """(user, password) from an env file with PDSERVE_NATS_USER= and PDSERVE_NATS_PASSWORD= lines."""
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    key, value = line.split("=", 1)
                    values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    except OSError as e:
        raise CredentialsFileError(f"cannot read {path!r} ({e.strerror})") from e
    user, password = values.get("PDSERVE_NATS_USER"), values.get("PDSERVE_NATS_PASSWORD")
    if not user or not password:
        raise CredentialsFileError(f"{path!r} has no PDSERVE_NATS_USER= and PDSERVE_NATS_PASSWORD= lines")
    return user, password


# ------------------------------------------------------------------------------------ pdserve nats-config

AUTHORIZATION_FILE = "nats-authorization.conf"


def add_config_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help=f"directory to write {AUTHORIZATION_FILE} and one ROLE.env per role into (made private)")
    parser.add_argument("--max-payload", type=int, default=8 * 1024 * 1024,
                        help="largest NATS message in bytes, written into the server configuration; prompts travel "
                             "as token ids in one message [default 8 MiB, NATS' own default is 1 MiB]")
    parser.add_argument("--force", action="store_true", help="overwrite files that exist")


def config_command(args) -> int:
    """`pdserve nats-config`: the server's authorization block and each role's identity, for a NATS you run."""
    import sys

    conf = os.path.join(args.out, AUTHORIZATION_FILE)
    paths = [conf, *(credentials_path(args.out, role) for role in ROLES)]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.force:
        print(f"pdserve nats-config: {', '.join(existing)} exist; pass --force to replace them (every service "
              "then needs its new file)", file=sys.stderr)
        return 1
    credentials = generate()
    write_credentials(args.out, credentials)
    write_private(conf, authorization_block(credentials) + f"max_payload: {int(args.max_payload)}\n")
    print(f"""wrote {conf} and {', '.join(f'{r}.env' for r in ROLES)} in {args.out}
1. In each nats-server's configuration (every server of a cluster): include {AUTHORIZATION_FILE}
   (copy it next to the configuration file; it holds passwords: keep it private), then restart the servers.
2. Give each host the file of the role it runs, and start the service with it:
     pdserve prefill-worker --nats nats://HOST:4222 --nats-credentials-file prefill.env
   (or PDSERVE_NATS_CREDENTIALS_FILE=...; `pdserve up --nats URL --nats-credentials-dir {args.out}` for all).
3. Watch with the observer's identity: pdserve status --nats URL --nats-credentials-file observer.env""")
    return 0
