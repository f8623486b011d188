"""Tokens: every refusal has its own reason, over a real server and in the verifier."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from pipeline.errors import BrokenResourceError, ConfigError, TokenError
from pipeline.server.tokens import (
    KickList,
    TokenVerifier,
    mint_token,
    resolve_secret,
)
from pipeline.transports.websocket import WebSocketTransport
from tests.test_server_support import (
    ROOT,
    SECRET,
    PoseSource,
    member,
    running_server,
    token,
    until,
)


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _claims(room: str = "A", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "sub": "alice",
        "room": room,
        "role": "publisher",
        "perms": ["publish_pose", "subscribe"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "j-" + os.urandom(4).hex(),
    }
    c.update(over)
    return c


def _rsa_token() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(_claims(), key, algorithm="RS256")


def _header_says_rs256_but_hmac() -> str:
    # RS/HS confusion the other way round: an HMAC-SHA256 signature under an RS256 header.
    signing_input = f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(_claims())}"
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def _alg_none() -> str:
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."


REFUSALS: list[tuple[str, Any, str]] = [
    ("expired", lambda: token("A", now=time.time() - 7200, ttl_s=60), "expired"),
    (
        "not yet valid",
        lambda: token("A", not_before=time.time() + 3600, ttl_s=7200),
        "not_yet_valid",
    ),
    ("wrong room", lambda: token("B"), "wrong_room"),
    ("wrong signature", lambda: mint_token("y" * 40, room="A", role="publisher"), "bad_signature"),
    ("alg none", _alg_none, "bad_algorithm"),
    ("RS256 signed with a key pair", _rsa_token, "bad_algorithm"),
    ("RS256 header, HMAC signature", _header_says_rs256_but_hmac, "bad_algorithm"),
    ("not a JWT", lambda: "garbage.not.ajwt", "malformed"),
    (
        "claims missing",
        lambda: jwt.encode({"sub": "x", "exp": time.time() + 60}, SECRET, algorithm="HS256"),
        "malformed",
    ),
]


@pytest.mark.parametrize(("case", "make", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_verifier_refusals(case: str, make: Any, reason: str) -> None:
    v = TokenVerifier(SECRET)
    with pytest.raises(TokenError) as info:
        v.verify(make(), room="A", require=["publish_pose"])
    assert info.value.reason == reason, (case, str(info.value))


def test_verifier_accepts_valid_and_checks_permissions() -> None:
    v = TokenVerifier(SECRET)
    claims = v.verify(token("A", "publisher", subject="p1"), room="A", require=["publish_pose"])
    assert claims.subject == "p1" and "publish_pose" in claims.perms
    with pytest.raises(TokenError) as info:
        v.verify(token("A", "subscriber"), room="A", require=["publish_pose"])
    assert info.value.reason == "missing_permission"
    assert v.verify(token("*", "moderator"), room="anything").room == "*"


def test_kick_list_refuses_jti_and_subject_for_token_life() -> None:
    kicks = KickList()
    v = TokenVerifier(SECRET, kicks=kicks)
    t1 = token("A", subject="bob")
    kicks.kick(v.decode(t1), "A")
    for t in (t1, token("A", subject="bob")):
        with pytest.raises(TokenError) as info:
            v.verify(t, room="A")
        assert info.value.reason == "kicked"
    v.verify(token("A", subject="carol"), room="A")
    v.verify(token("B", subject="bob"), room="B")  # kicked from A only
    kicks.prune(time.time() + 10**6)
    assert len(kicks) == 0


def test_secret_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import ServerConfig

    monkeypatch.delenv("POSEWIRE_SECRET", raising=False)
    with pytest.raises(ConfigError, match="POSEWIRE_SECRET"):
        resolve_secret(ServerConfig())
    assert len(resolve_secret(ServerConfig(), dev=True)) >= 32
    assert resolve_secret(ServerConfig(secret=SECRET)) == SECRET
    monkeypatch.setenv("POSEWIRE_SECRET", "e" * 40)
    assert resolve_secret(ServerConfig(secret=SECRET)) == "e" * 40
    monkeypatch.setenv("POSEWIRE_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 32"):
        resolve_secret(None)


# --------------------------------------------------------------------------- over the wire


async def _join(url: str, tok: str, *, publish: bool = True) -> WebSocketTransport:
    t = WebSocketTransport(url, "A", tok, publish=publish, connect_timeout_s=3.0)
    await t.connect()
    return t


def test_token_table_over_the_wire() -> None:
    async def main() -> None:
        async with running_server() as srv:
            for case, make, reason in REFUSALS:
                with pytest.raises(TokenError) as info:
                    await _join(srv.url, make())
                assert info.value.reason == reason, (case, str(info.value))
            # a subscriber-only token asking to publish
            with pytest.raises(TokenError) as info:
                await _join(srv.url, token("A", "subscriber"), publish=True)
            assert info.value.reason == "missing_permission"
            # valid: accepted
            ok = await _join(srv.url, token("A", "publisher"))
            assert ok.member_id
            await ok.close()
            rejections = srv.state.metrics.rejections
            for reason in ("expired", "not_yet_valid", "wrong_room", "bad_signature"):
                assert rejections[reason] >= 1, reason

    asyncio.run(main())


def test_publishing_without_publish_pose_is_closed_with_its_reason() -> None:
    async def main() -> None:
        async with running_server() as srv:
            sub = member(srv, "A", "subscriber")
            await sub.connect()
            await sub.send(PoseSource(3).next())
            with pytest.raises(TokenError) as info:
                async with asyncio.timeout(5):
                    while True:
                        await sub.recv()
            assert info.value.reason == "missing_permission"
            await sub.close()

    asyncio.run(main())


def test_kicked_member_is_refused_for_the_token_life() -> None:
    async def main() -> None:
        async with running_server() as srv:
            mod = member(srv, "A", "moderator", subject="mod")
            await mod.connect()
            bob_token = token("A", "publisher", subject="bob")
            bob = WebSocketTransport(srv.url, "A", bob_token, connect_timeout_s=3.0)
            await bob.connect()
            await mod.send_control({"type": "kick", "member": bob.member_id})
            with pytest.raises(BrokenResourceError) as info:
                async with asyncio.timeout(5):
                    while True:
                        await bob.recv()
            assert info.value.reason == "kicked"
            await bob.close()
            # the same token, and a fresh token for the same subject: refused "kicked"
            for tok in (bob_token, token("A", "publisher", subject="bob")):
                with pytest.raises(TokenError) as info2:
                    await _join(srv.url, tok)
                assert info2.value.reason == "kicked"
            # someone else still gets in
            carol = await _join(srv.url, token("A", "publisher", subject="carol"))
            # a non-moderator cannot kick
            await carol.send_control({"type": "kick", "member": mod.member_id})
            items = await until(
                carol, lambda xs: any(getattr(x, "type", "") == "error" for x in xs)
            )
            err = next(x for x in items if getattr(x, "type", "") == "error")
            assert err.body["reason"] == "missing_permission"  # type: ignore[union-attr]
            await carol.close()
            await mod.close()

    asyncio.run(main())


def test_token_command_mints_what_the_server_accepts(tmp_path: Any) -> None:
    env = {**os.environ, "POSEWIRE_SECRET": SECRET}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "token", "--room", "A", "--role", "subscriber",
         "--ttl", "60", "--subject", "cli"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    claims = TokenVerifier(SECRET).verify(out.stdout.strip(), room="A", require=["subscribe"])
    assert claims.subject == "cli" and claims.role == "subscriber"
    assert claims.exp - claims.iat == 60
    env.pop("POSEWIRE_SECRET")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"server:\n  secret: {SECRET}\n", encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "token", "--room", "A", "--role", "moderator",
         "--config", str(cfg)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert TokenVerifier(SECRET).verify(out.stdout.strip(), room="A").role == "moderator"
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "token", "--room", "A", "--role", "subscriber"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "POSEWIRE_SECRET" in out.stderr and "Traceback" not in out.stderr
