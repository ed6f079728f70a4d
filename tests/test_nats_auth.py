"""The role permission table (pdserve.nats_auth): every subject pdserve uses is allowed to exactly the roles that
need it, and never shown to the observer when it carries prompts, tokens or secrets. Checked with NATS' own
wildcard rules (`*` one token, `>` the rest); test_least_privilege.py checks the same against nats-server."""

from __future__ import annotations

import pytest

from pdserve import nats_auth, subjects
from pdserve.nats_auth import permissions


def matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def may_publish(role: str, subject: str) -> bool:
    return any(matches(p, subject) for p in permissions(role).publish)


def may_receive(role: str, subject: str) -> bool:
    p = permissions(role)
    return any(matches(a, subject) for a in p.subscribe) and not any(matches(d, subject) for d in p.subscribe_deny)


# subject -> (roles that publish it, roles that receive it)
FLOWS = {
    subjects.prefill_request("p1"): ({"router"}, {"prefill"}),
    subjects.decode_request("d1"): ({"router"}, {"decode"}),
    subjects.token_stream("r1", "req-1"): ({"decode"}, {"router"}),
    subjects.prefix_lease("p1"): ({"router"}, {"prefill"}),
    # decode workers release what they pulled; prefill workers the cached prefix they pulled from a peer
    subjects.kv_release("p1"): ({"decode", "prefill"}, {"prefill"}),
    subjects.CANCEL: ({"router"}, {"prefill", "decode", "observer"}),
    subjects.KV_LOOKUP: ({"router"}, {"broker"}),
    subjects.KV_HELD: ({"prefill"}, {"broker", "observer"}),
    subjects.KV_TRANSFER_DONE: ({"decode"}, {"broker", "observer"}),
    subjects.KV_RESYNC: ({"broker"}, {"prefill", "decode", "observer"}),
    subjects.kv_events("p1"): ({"prefill", "decode"}, {"broker"}),
    subjects.heartbeat("prefill", "p1"): ({"prefill"}, {"router", "broker", "observer"}),
    subjects.heartbeat("decode", "d1"): ({"decode"}, {"router", "broker", "observer"}),
    subjects.heartbeat("broker", "b1"): ({"broker"}, {"router", "broker", "observer"}),
    subjects.goodbye("decode", "d1"): ({"decode"}, {"router", "broker", "observer"}),
    subjects.worker_stats("p1"): ({"observer"}, {"prefill", "decode", "observer"}),  # an empty request
}


@pytest.mark.parametrize("subject", sorted(FLOWS))
def test_each_subject_goes_only_where_it_must(subject):
    publishers, receivers = FLOWS[subject]
    assert {r for r in nats_auth.ROLES if may_publish(r, subject)} == publishers
    assert {r for r in nats_auth.ROLES if may_receive(r, subject)} == receivers


def test_replies_reach_only_their_own_identity():
    for role in nats_auth.ROLES:
        own = nats_auth.inbox_prefix(nats_auth.user_name(role)) + ".abc.def"
        assert {r for r in nats_auth.ROLES if may_receive(r, own)} == {role}
        assert not may_receive(role, "_INBOX.abc.def")
    assert {r for r in nats_auth.ROLES if permissions(r).allow_responses} == {"prefill", "decode", "broker"}


def test_credentials_files_round_trip(tmp_path):
    credentials = nats_auth.generate()
    nats_auth.write_credentials(str(tmp_path), credentials)
    for role, cred in credentials.items():
        path = nats_auth.credentials_path(str(tmp_path), role)
        assert nats_auth.read_credentials_file(path) == (cred.user, cred.password)
        assert (tmp_path / f"{role}.env").stat().st_mode & 0o077 == 0
    assert len({c.password for c in credentials.values()}) == len(credentials)
    block = nats_auth.authorization_block(credentials)
    assert block.count("user:") == len(nats_auth.ROLES) and "allow_responses: true" in block
    (tmp_path / "bad.env").write_text("PDSERVE_NATS_USER=x\n")
    with pytest.raises(nats_auth.CredentialsFileError, match="PDSERVE_NATS_PASSWORD"):
        nats_auth.read_credentials_file(str(tmp_path / "bad.env"))
