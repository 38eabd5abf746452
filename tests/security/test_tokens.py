"""The token store (hashed tokens, constant-time comparison), which RPCs need which role, bearer
metadata parsing, and the `potboiler hash-token` command."""

from __future__ import annotations

import hashlib
import hmac
import importlib
import io
import os
import pkgutil
from pathlib import Path

import pytest

import potboiler.v1
from potboiler.server import cli
from potboiler.server.auth import bearer_token, required_role
from potboiler.server.config_files import SecurityConfigError, file_version
from potboiler.server.security import SecurityConfig
from potboiler.server.tokens import PeerToken, Role, TokenStore, hash_token, token_line


def test_tokens_are_stored_as_their_sha256() -> None:
    assert hash_token("s3cret") == hashlib.sha256(b"s3cret").hexdigest()
    assert token_line("s3cret", Role.WRITE) == f"{hashlib.sha256(b's3cret').hexdigest()} write"


def test_a_store_gives_each_token_its_role() -> None:
    store = TokenStore.parse(
        "\n".join(
            [
                "# comment",
                "",
                token_line("reader", Role.READ),
                f"{hash_token('writer').upper()} WRITE  ci-deploy",
                token_line("operator", Role.ADMIN),
            ]
        )
    )
    assert len(store) == 3
    assert store.role_of("reader") is Role.READ
    assert store.role_of("writer") is Role.WRITE
    assert store.role_of("operator") is Role.ADMIN
    assert store.role_of("nobody") is None
    assert store.role_of("") is None
    assert store.role_of("x" * 10_000) is None


def test_the_same_token_listed_twice_gets_the_stronger_role() -> None:
    store = TokenStore.parse(f"{token_line('t', Role.WRITE)}\n{token_line('t', Role.READ)}\n")
    assert store.role_of("t") is Role.WRITE
    store = TokenStore.parse(f"{token_line('t', Role.ADMIN)}\n{token_line('t', Role.WRITE)}\n")
    assert store.role_of("t") is Role.ADMIN


def test_every_stored_hash_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hmac.compare_digest` against every entry, whether or not (and wherever) one matches:
    neither the time of one comparison nor the number of comparisons depends on the token."""
    store = TokenStore([(hash_token(f"token{i}"), Role.READ) for i in range(5)])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token, expected in (("token0", Role.READ), ("token4", Role.READ), ("wrong", None)):
        calls.clear()
        assert store.role_of(token) is expected
        assert len(calls) == len(store)
        assert all(a == hash_token(token).encode() for a, _ in calls)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "no tokens"),
        ("# only a comment\n", "no tokens"),
        ("abc read\n", "not a SHA-256"),
        (f"{hash_token('x')}\n", "expected"),
        (f"{hash_token('x')} owner\n", "not a role"),
        (f"{'g' * 64} read\n", "not a SHA-256"),
    ],
)
def test_a_malformed_tokens_file_is_refused(text: str, error: str) -> None:
    with pytest.raises(SecurityConfigError, match=error):
        TokenStore.parse(text)


@pytest.mark.parametrize("line", ["MyPlainSecretToken123 write", "read MyPlainSecretToken123"])
def test_a_token_written_where_its_hash_belongs_is_not_repeated_in_the_error(line: str) -> None:
    """The error goes to the node's log and stderr: it names the line, not the secret on it."""
    with pytest.raises(SecurityConfigError) as info:
        TokenStore.parse(line + "\n", "tokens")
    assert "MyPlainSecretToken123" not in str(info.value)
    assert str(info.value).startswith("tokens:1: ")


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="cannot read"):
        TokenStore.load(tmp_path / "absent")


def test_reloading_takes_the_files_tokens_instead_or_keeps_them_if_it_is_not_valid(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(token_line("old", Role.WRITE) + "\n")
    tokens = TokenStore.load(path)
    path.write_text(token_line("new", Role.READ) + "\n" + token_line("newer", Role.ADMIN) + "\n")
    assert tokens.reload() == 2
    assert (tokens.role_of("old"), tokens.role_of("new"), tokens.role_of("newer")) == (
        None,
        Role.READ,
        Role.ADMIN,
    )
    path.write_text("not a tokens file\n")
    with pytest.raises(SecurityConfigError):
        tokens.reload()
    assert tokens.role_of("new") is Role.READ
    path.unlink()
    with pytest.raises(SecurityConfigError, match="cannot read"):
        tokens.reload()
    assert tokens.role_of("newer") is Role.ADMIN
    with pytest.raises(SecurityConfigError, match="not read from a file"):
        TokenStore.parse(token_line("x", Role.READ)).reload()


def test_a_tokens_file_left_with_no_tokens_revokes_them_all(tmp_path: Path) -> None:
    """(It used to be refused as not valid, leaving every token working.) At start such a file is
    refused: every call would be."""
    path = tmp_path / "tokens"
    path.write_text(token_line("old", Role.ADMIN) + "\n")
    tokens = TokenStore.load(path)
    path.write_text("# every token revoked\n")
    assert tokens.reload() == 0
    assert tokens.role_of("old") is None
    with pytest.raises(SecurityConfigError, match="holds no tokens"):
        TokenStore.load(path)


def test_a_peer_token_file_is_read_again_or_kept_if_it_holds_no_token(tmp_path: Path) -> None:
    path = tmp_path / "peer-token"
    path.write_text("first-token\n")
    token = PeerToken.load(path)
    assert token.token == "first-token"
    path.write_text("  second-token \n")
    token.reload()
    assert SecurityConfig(peer_token=token).peer_metadata() == (("authorization", "Bearer second-token"),)
    path.write_text("\n")
    with pytest.raises(SecurityConfigError, match="is empty"):
        token.reload()
    path.unlink()
    with pytest.raises(SecurityConfigError, match="cannot read"):
        token.reload()
    assert token.token == "second-token"
    blank = tmp_path / "blank"
    blank.write_text("")
    with pytest.raises(SecurityConfigError, match="is empty"):
        PeerToken.load(blank)
    with pytest.raises(SecurityConfigError, match="not read from a file"):
        PeerToken("given").reload()


def test_the_version_of_a_file_is_the_one_read(tmp_path: Path) -> None:
    # Taken before the file is read: a watch from this version on sees every later change.
    path = tmp_path / "peer-token"
    path.write_text("first-token\n")
    token = PeerToken.load(path)
    assert token.version == file_version(path) is not None
    path.write_text("the-second-token\n")
    assert token.version != file_version(path)
    token.reload()
    assert token.version == file_version(path)
    tokens_path = tmp_path / "tokens"
    tokens_path.write_text(token_line("x", Role.READ) + "\n")
    tokens = TokenStore.load(tokens_path)
    assert tokens.version == file_version(tokens_path)
    tokens_path.write_text(token_line("x", Role.READ) + "\n" + token_line("y", Role.WRITE) + "\n")
    tokens.reload()
    assert tokens.version == file_version(tokens_path)
    # Rewritten in place with as many bytes within one tick of the file system's clock (same size,
    # inode and mtime): another version all the same; the same bytes again are not.
    stat = path.stat()
    path.write_text("the-second-tokem\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_version(path) != token.version
    path.write_text("the-second-token\n")
    assert file_version(path) == token.version
    path.unlink()
    with pytest.raises(SecurityConfigError):
        token.reload()
    assert token.version is not None  # kept with the token in use


@pytest.mark.parametrize("text", ["old-token\nnew-token\n", "two words", "t\u00f6ken", "tab\there"])
def test_a_peer_token_that_cannot_travel_as_a_header_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "peer-token"
    path.write_text(text)
    with pytest.raises(SecurityConfigError, match="characters a token cannot have"):
        PeerToken.load(path)
    with pytest.raises(SecurityConfigError, match="characters a token cannot have"):
        PeerToken(text.strip())
    path.write_text("good-token")
    token = PeerToken.load(path)
    path.write_text(text)
    with pytest.raises(SecurityConfigError):
        token.reload()
    assert token.token == "good-token"


@pytest.mark.parametrize(
    ("method", "role"),
    [
        ("/grpc.health.v1.Health/Check", None),
        ("/grpc.health.v1.Health/Watch", Role.READ),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Role.READ),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Role.READ),
        ("/potboiler.v1.CoreRestService/GetLogHeads", Role.READ),
        ("/potboiler.v1.CoreRestService/PostLogEntry", Role.WRITE),
        ("/potboiler.v1.LogService/ListHeads", Role.READ),
        ("/potboiler.v1.LogService/SubscribeEntries", Role.READ),
        ("/potboiler.v1.LogService/AppendEntry", Role.WRITE),
        ("/potboiler.v1.LogService/AppendEntryStream", Role.WRITE),
        ("/potboiler.v1.NodesService/GetStatus", Role.READ),
        ("/potboiler.v1.NodesService/AddNode", Role.ADMIN),
        ("/potboiler.v1.NodesService/RemoveNode", Role.ADMIN),
        ("/potboiler.v1.WebhooksService/ListWebhooks", Role.WRITE),  # webhook URLs may hold secrets
        ("/potboiler.v1.WebhooksService/RegisterWebhook", Role.WRITE),
        ("/potboiler.v1.KvService/GetValue", Role.READ),
        ("/potboiler.v1.KvService/UpdateValue", Role.WRITE),
        ("/potboiler.v1.KvBrowserService/GetIndexPage", Role.READ),
        ("/potboiler.v1.PigtailRestService/RestGetTask", Role.READ),
        ("/potboiler.v1.PigtailRestService/RestClaimTask", Role.WRITE),
        ("/potboiler.v1.PigtailService/LeaseTasks", Role.WRITE),
        ("/potboiler.v1.ReplicationService/Replicate", Role.ADMIN),
        ("/potboiler.v1.NodesService/SetPeers", Role.ADMIN),  # any later one too (fail closed)
        ("/potboiler.v1.ReplicationService/GetReplicas", Role.READ),
        ("/potboiler.v1.SomethingNew/DoIt", Role.WRITE),
    ],
)
def test_reads_need_any_token_the_cluster_rpcs_an_admin_one_and_the_rest_a_write_one(
    method: str, role: Role | None
) -> None:
    assert required_role(method) is role


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("x-other", "1"), ("Authorization", "bearer  abc ")], "abc"),
        ([("authorization", b"Bearer abc")], "abc"),
        ([("authorization", "Basic abc")], None),
        ([("authorization", "Bearer ")], None),
        ([], None),
        (None, None),
    ],
)
def test_bearer_tokens_are_read_from_the_authorization_metadata(
    metadata: list[tuple[str, str | bytes]] | None, token: str | None
) -> None:
    assert bearer_token(metadata) == token


def test_hash_token_prints_a_tokens_file_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hash-token", "--role", "write", "abc"]) == 0
    assert capsys.readouterr().out == f"{hash_token('abc')} write\n"


def test_hash_token_reads_the_token_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert cli.main(["hash-token", "-"]) == 0
    assert capsys.readouterr().out == f"{hash_token('from-stdin')} read\n"


def test_hash_token_without_a_token_makes_a_random_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hash-token", "--role", "read"]) == 0
    out = capsys.readouterr()
    token = out.err.rsplit(": ", 1)[1].strip()
    assert len(token) >= 40
    assert out.out == f"{hash_token(token)} read\n"
    assert TokenStore.parse(out.out).role_of(token) is Role.READ


def test_node_refuses_to_start_with_bad_security_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["node", "--data-dir", str(tmp_path / "d")]
    assert cli.main([*base, "--tls-ca", str(tmp_path / "ca.pem")]) == 2
    assert "all of --tls-ca, --tls-cert and --tls-key" in capsys.readouterr().err
    assert cli.main([*base, "--auth-tokens", str(tmp_path / "none")]) == 2
    assert "cannot read the tokens file" in capsys.readouterr().err
    assert cli.main([*base, "--webhook-policy", "allowlist"]) == 2
    assert "needs at least one --webhook-allow" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cluster_passes_its_security_flags_to_every_node(tmp_path: Path) -> None:
    args = cli.parser().parse_args(
        [
            "cluster", "--data-dir", str(tmp_path / "c"),
            "--tls-ca", "ca.pem", "--tls-cert", "cert.pem", "--tls-key", "key.pem",
            "--auth-tokens", "tokens", "--peer-token", "p",
            "--rest-tls-cert", "rest.pem", "--rest-tls-key", "rest.key",
            "--webhook-policy", "allowlist", "--webhook-allow", "hooks.example:443",
        ]
    )  # fmt: skip
    forwarded = cli.forwarded_security_args(args)
    node_args = cli.parser().parse_args(["node", *forwarded])
    for name in ("tls_ca", "tls_cert", "tls_key", "auth_tokens", "rest_tls_cert", "rest_tls_key"):
        value = getattr(node_args, name)
        assert value == Path(getattr(args, name)).resolve() and value.is_absolute()
    # The peer token reaches the nodes in a file only this user reads, not on their command lines.
    assert "p" not in forwarded and node_args.peer_token is None
    assert node_args.peer_token_file == tmp_path / "c" / "peer-token"
    assert node_args.peer_token_file.read_text() == "p\n"
    assert node_args.peer_token_file.stat().st_mode & 0o777 == 0o600
    # A link under that name is replaced, not written through.
    victim = tmp_path / "victim"
    victim.write_text("keep")
    node_args.peer_token_file.unlink()
    node_args.peer_token_file.symlink_to(victim)
    cli.forwarded_security_args(args)
    assert victim.read_text() == "keep" and not node_args.peer_token_file.is_symlink()
    assert node_args.webhook_policy == "allowlist"
    assert node_args.webhook_allow == ["hooks.example:443"]
    plain = cli.forwarded_security_args(cli.parser().parse_args(["cluster"]))
    assert plain == ["--webhook-policy", "allow-all"]


def test_tokens_without_mtls_or_a_peer_token_are_warned_about() -> None:
    tokens = TokenStore.parse(token_line("t", Role.WRITE))
    assert SecurityConfig(tokens=tokens).warnings() != []
    assert "UNAUTHENTICATED" in SecurityConfig(tokens=tokens).warnings()[0]
    assert SecurityConfig().warnings() == []


def test_a_peer_token_below_admin_in_the_nodes_own_file_is_warned_about() -> None:
    tokens = TokenStore.parse(f"{token_line('w', Role.WRITE)}\n{token_line('a', Role.ADMIN)}\n")
    [warning] = SecurityConfig(tokens=tokens, peer_token=PeerToken("w")).warnings()
    assert "write token" in warning and "needs an admin token" in warning
    assert SecurityConfig(tokens=tokens, peer_token=PeerToken("a")).warnings() == []
    [missing] = SecurityConfig(tokens=tokens, peer_token=PeerToken("other")).warnings()
    assert "not in this node's tokens file" in missing


#: Every RPC of ours a read token may call. Roles follow the name (Get*/List*/Subscribe*), so a new RPC
#: named like a read is one: this list makes adding it a decision (a `GetOrCreate…` must not be here).
READ_RPCS = {
    "CoreRestService": {"GetLogHeads", "GetLogFirsts", "GetLogEntry", "GetNodes"},
    "KvBrowserService": {"GetIndexPage", "GetTablePage"},
    "KvService": {"GetValue", "ListTables", "ListKeys"},
    "KvRestService": {"GetKvTables", "GetKvKeys", "GetKvValue"},
    "LogService": {"GetEntry", "ListHeads", "SubscribeEntries"},
    "NodesService": {"ListNodes", "GetStatus"},
    "PigtailService": {"GetQueue", "ListQueues", "GetTask", "ListTasks", "ListDeadTasks"},
    "PigtailRestService": {"RestListQueues", "RestListTasks", "RestListDeadTasks", "RestGetTask"},
}


ADMIN_RPCS = {"NodesService": {"AddNode", "RemoveNode"}, "ReplicationService": {"Replicate"}}


def test_exactly_the_listed_rpcs_are_reads_or_admin_and_every_other_one_a_write() -> None:
    seen: dict[str, set[str]] = {}
    admin: dict[str, set[str]] = {}
    for module in pkgutil.iter_modules(potboiler.v1.__path__):
        if not module.name.endswith("_pb2"):
            continue
        file = importlib.import_module(f"potboiler.v1.{module.name}").DESCRIPTOR
        for service in file.services_by_name.values():
            for method in service.methods:
                role = required_role(f"/{service.full_name}/{method.name}")
                assert role is not None, f"{service.name}/{method.name} is open to anyone"
                if role is Role.READ:
                    seen.setdefault(service.name, set()).add(method.name)
                if role is Role.ADMIN:
                    admin.setdefault(service.name, set()).add(method.name)
    assert seen == READ_RPCS
    assert admin == ADMIN_RPCS
