"""Bearer tokens: the tokens a node accepts (`TokenStore`), stored as SHA-256 hashes with a role
(`read`, `write` or `admin`), and the token it presents when dialing peers (`PeerToken`). Both can
be read again from their files while the node runs. Checking each call's token is the job of
`potboiler.server.auth`."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable
from pathlib import Path

from potboiler.server.config_files import FileVersion, SecurityConfigError, read_versioned


class Role(enum.Enum):
    """What a token may do: `read` calls only read RPCs; `write` also appends, writes KV and
    Pigtail and registers webhooks; `admin` also changes the cluster (adds and removes members) and
    replicates (a peer token, without mTLS, must be an admin token)."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    def allows(self, need: Role) -> bool:
        """Whether a token of this role may call an RPC that needs `need`."""
        return _RANK[self] >= _RANK[need]


_RANK = {Role.READ: 0, Role.WRITE: 1, Role.ADMIN: 2}


#: Longest bearer token accepted (longer ones are refused unhashed).
MAX_TOKEN_LENGTH = 4096


def hash_token(token: str) -> str:
    """The stored form of a token: the hex SHA-256 of its UTF-8 bytes. Tokens are random secrets
    (`potboiler hash-token` makes 32 random bytes), so a fast hash is enough: there is nothing to
    guess from it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_line(token: str, role: Role) -> str:
    """One line of a tokens file for `token`."""
    return f"{hash_token(token)} {role.value}"


class TokenStore:
    """Hashed tokens with their roles, as read from a tokens file.

    The file has one token per line, `<sha256 hex of the token> <read|write|admin> [label]`; blank lines
    and lines starting with `#` are ignored. A presented token is hashed and compared with EVERY
    stored hash using `hmac.compare_digest` (constant time, no early exit), so neither the timing of
    one comparison nor the number of comparisons tells how close a guess was or which entry it hit.
    """

    def __init__(self, entries: Iterable[tuple[str, Role]]) -> None:
        self._entries: list[tuple[bytes, Role]] = []
        #: The tokens file they were read from, if any (see `reload`), and the version read.
        self.path: Path | None = None
        self.version: FileVersion | None = None
        for digest, role in entries:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                # Not shown: it may be a token itself, written where its hash belongs.
                raise SecurityConfigError(
                    "the first field is not a SHA-256 hex digest (a token itself? store the line "
                    "`potboiler hash-token` prints for it)"
                )
            self._entries.append((digest.lower().encode(), role))

    @classmethod
    def parse(cls, text: str, source: str = "tokens file", *, allow_empty: bool = False) -> TokenStore:
        """Tokens from the text of a tokens file (one without any refused unless `allow_empty`)."""
        entries = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 2:
                raise SecurityConfigError(f"{source}:{number}: expected '<sha256 hex> <read|write|admin>'")
            try:
                role = Role(fields[1].lower())
            except ValueError:
                raise SecurityConfigError(  # the field not shown: it may be a secret
                    f"{source}:{number}: the second field is not a role ('read', 'write' or 'admin')"
                ) from None
            try:
                cls([(fields[0], role)])
            except SecurityConfigError as exc:
                raise SecurityConfigError(f"{source}:{number}: {exc}") from None
            entries.append((fields[0], role))
        if not entries and not allow_empty:
            raise SecurityConfigError(f"{source} holds no tokens (every call would be refused)")
        return cls(entries)

    @classmethod
    def load(cls, path: Path, *, allow_empty: bool = False) -> TokenStore:
        """Tokens from a tokens file (see `parse`)."""
        text, version = read_versioned(path, "tokens file")
        tokens = cls.parse(text, str(path), allow_empty=allow_empty)
        tokens.path, tokens.version = path, version
        return tokens

    def reload(self) -> int:
        """Read the tokens file again and take its tokens in place of these, all at once (calls
        checked from then on see only the new ones); returns how many. A file left with no tokens
        (every line removed or commented out) revokes them all: an operator locking everything
        down. SecurityConfigError, keeping these, if the file cannot be read or is not a valid
        tokens file."""
        if self.path is None:
            raise SecurityConfigError("these tokens were not read from a file")
        loaded = TokenStore.load(self.path, allow_empty=True)
        self._entries, self.version = loaded._entries, loaded.version
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def role_of(self, token: str) -> Role | None:
        """The role of `token`, or None if it is not one of the stored tokens."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        presented = hash_token(token).encode()
        found: Role | None = None
        for digest, role in self._entries:
            # Every entry is compared, matched or not: the time taken does not depend on which one.
            if hmac.compare_digest(presented, digest) and (found is None or role.allows(found)):
                found = role
        return found


class PeerToken:
    """The token a node presents when dialing peers, and the file it was read from, if any."""

    def __init__(self, token: str, path: Path | None = None, version: FileVersion | None = None) -> None:
        #: The file it was read from, if any, and the version read.
        self.path = path
        self.version = version
        self.token = self._checked(token)

    @classmethod
    def load(cls, path: Path) -> PeerToken:
        """The token of a peer token file (its text, stripped)."""
        text, version = read_versioned(path, "peer token file")
        if not (token := text.strip()):
            raise SecurityConfigError(f"the peer token file {path} is empty")
        return cls(token, path, version)

    def reload(self) -> None:
        """Read the file again and take its token (for the calls dialed from now on).
        SecurityConfigError, keeping this token, if it cannot be read or holds none."""
        if self.path is None:
            raise SecurityConfigError("the peer token was not read from a file")
        loaded = PeerToken.load(self.path)
        self.token, self.version = loaded.token, loaded.version

    def _checked(self, token: str) -> str:
        # It travels as a header value: a space, a line break or a non-ASCII character would make
        # grpc drop the header and leave the dialed call hanging.
        if not _TOKEN_TEXT.fullmatch(token):
            source = f"the peer token file {self.path}" if self.path else "the peer token"
            raise SecurityConfigError(
                f"{source} holds more than one token, or characters a token cannot have "
                "(only printable ASCII without spaces)"
            )
        return token


_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")
