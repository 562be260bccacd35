"""A YARN ApplicationMaster client: register, heartbeat and finish over Hadoop RPC.

The kernel launcher runs as a YARN application's AM container (``launcher: yarn``), and a real
ResourceManager keeps such an application ACCEPTED until its AM registers, expires the attempt
when it stops heartbeating (``yarn.am.liveness-monitor.expiry-interval-ms``, 10 minutes by
default), and gives the application its final status from ``finishApplicationMaster``. This
module speaks the three calls of ``ApplicationMasterProtocol`` that take:

- the AMRMToken comes from the container's credentials file (``HADOOP_TOKEN_FILE_LOCATION``,
  Hadoop's token storage: ``HDTS`` + 0 (Writable) or 1 (protobuf)); its service is the
  scheduler's address (``host:port``, a comma list for an HA pair);
- Hadoop RPC v9: the connection header ``hrpc 9 0 -33`` (SASL), frames of a 4-byte length and
  varint-delimited protobuf messages (RpcRequestHeaderProto / RpcResponseHeaderProto, RpcSaslProto,
  IpcConnectionContextProto, RequestHeaderProto);
- SASL DIGEST-MD5 (RFC 2831) through the TOKEN method: the user name is the token's identifier
  and the password its password, both base64, as Hadoop's SaslRpcClient does; with
  ``hadoop.rpc.protection`` integrity or privacy, its security layer (HMAC-MD5, and RC4 for
  privacy) over every later message, in SASL WRAP messages.

The rule of this module, as of the kernel launcher that imports it: the standard library only.
Protobuf is hand-encoded: a varint codec and the few fields used here, by field number, named in
``yarn_service_protos.proto``, ``RpcHeader.proto``, ``IpcConnectionContext.proto`` and
``ProtobufRpcEngine.proto`` of Hadoop 3.3. What it does not do: privacy with the DES ciphers
(an RM offering only 3des/des is refused with that reason), ask for containers (``allocate``
only heartbeats), Kerberos (an AM never needs it).

Proven against Hadoop's own RPC server and ``Credentials`` class (tests/yarn_am/, compiled
against pyspark's Hadoop jars), not yet against a real ResourceManager.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("poolgate.yarn_am")

PROTOCOL = "org.apache.hadoop.yarn.api.ApplicationMasterProtocolPB"
AMRM_KIND = "YARN_AM_RM_TOKEN"
SASL_CALL_ID = -33          # AuthProtocol.SASL
CONTEXT_CALL_ID = -3        # the connection context
MAX_FRAME = 64 * 1024 * 1024
FINAL_STATUS = {"UNDEFINED": 0, "SUCCEEDED": 1, "FAILED": 2, "KILLED": 3, "ENDED": 4}
AM_RESYNC, AM_SHUTDOWN = 1, 2
SASL_STATE = {0: "SUCCESS", 1: "NEGOTIATE", 2: "INITIATE", 3: "CHALLENGE", 4: "RESPONSE",
              5: "WRAP"}


class AMError(Exception):
    """The RM refused, or could not be reached; ``str()`` says which and why."""


class AMConnectionError(AMError):
    """The connection broke (or never opened): a new one may do better."""


# -- protobuf, by hand -----------------------------------------------------------------------


def varint(n: int) -> bytes:
    """Base-128 varint of ``n`` (a negative int as its 64-bit two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); ValueError on a truncated or over-long varint."""
    shift = result = 0
    while shift < 70:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint too long")


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(raw)) + raw


def field_float(number: int, value: float) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<f", value)


Fields = dict[int, list[int | bytes]]


def decode(data: bytes) -> Fields:
    """A message's fields: number → values (varints as int, length-delimited as bytes; fixed
    32/64-bit values as int)."""
    fields: Fields = {}
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            size, pos = read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def first_int(fields: Fields, number: int, default: int = 0) -> int:
    values = [v for v in fields.get(number, []) if isinstance(v, int)]
    return values[0] if values else default


def first_bytes(fields: Fields, number: int) -> bytes:
    values = [v for v in fields.get(number, []) if isinstance(v, bytes)]
    return values[0] if values else b""


def delimited(message: bytes) -> bytes:
    return varint(len(message)) + message


# -- the credentials file --------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """One Hadoop token: identifier and password bytes, kind, service (``host:port``)."""

    alias: str
    identifier: bytes
    password: bytes
    kind: str
    service: str


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated token storage")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def vlong(self) -> int:
        """Hadoop's WritableUtils.readVLong."""
        first = struct.unpack("b", self.take(1))[0]
        if first >= -112:
            return int(first)
        size = -119 - first if first < -120 else -111 - first
        value = int.from_bytes(self.take(size - 1), "big")
        return ~value if first < -120 else value

    def text(self) -> bytes:
        return self.take(self.vlong())


def read_credentials(data: bytes) -> list[Token]:
    """The tokens in a Hadoop token storage file (``Credentials.writeTokenStorageToStream``)."""
    if data[:4] != b"HDTS" or len(data) < 5:
        raise ValueError("not a Hadoop token storage file (no HDTS magic)")
    version, r = data[4], _Reader(data[5:])
    tokens = []
    if version == 0:  # Writable
        for _ in range(r.vlong()):
            alias = r.text().decode()
            ident, password = r.text(), r.text()
            kind, service = r.text().decode(), r.text().decode()
            tokens.append(Token(alias, ident, password, kind, service))
    elif version == 1:  # CredentialsProto, varint-delimited
        size, pos = read_varint(r.data, 0)
        for kv in decode(r.data[pos:pos + size]).get(1, []):
            entry = decode(kv) if isinstance(kv, bytes) else {}
            tok = decode(first_bytes(entry, 2))
            tokens.append(Token(first_bytes(entry, 1).decode(), first_bytes(tok, 1),
                                first_bytes(tok, 2), first_bytes(tok, 3).decode(),
                                first_bytes(tok, 4).decode()))
    else:
        raise ValueError(f"token storage version {version} is not known")
    return tokens


def amrm_token(path: str) -> Token:
    """The AMRMToken in the credentials file at ``path``; AMError when there is none."""
    try:
        with open(path, "rb") as f:
            tokens = read_credentials(f.read())
    except (OSError, ValueError) as exc:
        raise AMError(f"cannot read the container's credentials {path}: {exc}") from None
    for token in tokens:
        if token.kind == AMRM_KIND:
            return token
    kinds = ", ".join(t.kind for t in tokens) or "none"
    raise AMError(f"the container's credentials {path} hold no {AMRM_KIND} (kinds: {kinds})")


# -- SASL DIGEST-MD5 (RFC 2831), client side ------------------------------------------------


def parse_directives(challenge: bytes) -> dict[str, str]:
    """``k=v,k="v"`` pairs of a DIGEST-MD5 challenge (quoted values may hold commas)."""
    out: dict[str, str] = {}
    text, i = challenge.decode("utf-8"), 0
    while i < len(text):
        while i < len(text) and text[i] in " ,\t":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        name, i = text[i:eq].strip().lower(), eq + 1
        if i < len(text) and text[i] == '"':
            i += 1
            value = []
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text):
                    i += 1
                value.append(text[i])
                i += 1
            i += 1
            out[name] = "".join(value)
        else:
            end = text.find(",", i)
            end = len(text) if end < 0 else end
            out[name], i = text[i:end].strip(), end
    return out


def _hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class RC4:
    """The RC4 stream cipher: DIGEST-MD5's ``rc4`` privacy cipher (RFC 2831 2.4) is RC4 keyed
    with the 16-byte sealing key, its stream running on across messages."""

    def __init__(self, key: bytes) -> None:
        box, j = list(range(256)), 0
        for i in range(256):
            j = (j + box[i] + key[i % len(key)]) & 0xFF
            box[i], box[j] = box[j], box[i]
        self.box, self.i, self.j = box, 0, 0

    def apply(self, data: bytes) -> bytes:
        box, i, j, out = self.box, self.i, self.j, bytearray(data)
        for n in range(len(out)):
            i = (i + 1) & 0xFF
            j = (j + box[i]) & 0xFF
            box[i], box[j] = box[j], box[i]
            out[n] ^= box[(box[i] + box[j]) & 0xFF]
        self.i, self.j = i, j
        return bytes(out)


#: qop choices, cheapest first; privacy only with the RC4 ciphers (3des/des need a DES).
QOPS = ("auth", "auth-int", "auth-conf")
RC4_KEY_BYTES = {"rc4": 16, "rc4-56": 7, "rc4-40": 5}


class DigestMD5:
    """The client half of DIGEST-MD5 for one token (RFC 2831), with its security layer.

    ``qop`` is the cheapest the server offers: ``auth`` (Hadoop's ``hadoop.rpc.protection``
    ``authentication``), else ``auth-int`` (``integrity``: every message carries an HMAC-MD5),
    else ``auth-conf`` (``privacy``: RC4-encrypted as well). After authentication,
    :meth:`wrap` and :meth:`unwrap` apply that layer.
    """

    def __init__(self, username: str, password: str, protocol: str, server_id: str) -> None:
        self.username, self.password = username, password
        self.digest_uri = f"{protocol}/{server_id}"
        self.cnonce = base64.b64encode(secrets.token_bytes(24)).decode()
        self.expected_rspauth = ""
        self.qop, self.cipher, self.maxbuf = "auth", "", 65536
        self.ha1 = b""
        self.seq_out = self.seq_in = 0
        self.ki_out = self.ki_in = b""
        self.rc4_out: RC4 | None = None
        self.rc4_in: RC4 | None = None

    def respond(self, challenge: bytes) -> bytes:
        d = parse_directives(challenge)
        offered = [q.strip() for q in d.get("qop", "auth").split(",")]
        ciphers = [c.strip() for c in d.get("cipher", "").split(",")]
        usable = [q for q in QOPS if q in offered and (
            q != "auth-conf" or any(c in RC4_KEY_BYTES for c in ciphers))]
        if not usable:
            raise AMError(f"the RM asks for SASL qop {d.get('qop')!r} with ciphers "
                          f"{d.get('cipher')!r}; this AM speaks auth, auth-int, and auth-conf "
                          "with rc4 only")
        if d.get("algorithm", "md5-sess") != "md5-sess" or "nonce" not in d:
            raise AMError(f"not a DIGEST-MD5 challenge poolgate understands: {challenge!r}")
        self.qop = usable[0]
        self.maxbuf = int(d.get("maxbuf", "65536") or 65536)
        realm, nonce, nc = d.get("realm", ""), d["nonce"], "00000001"
        secret = hashlib.md5(f"{self.username}:{realm}:{self.password}".encode()).digest()
        a1 = secret + f":{nonce}:{self.cnonce}".encode()
        self.ha1 = hashlib.md5(a1).digest()
        layer = ":" + "0" * 32 if self.qop != "auth" else ""
        tail = f"{nonce}:{nc}:{self.cnonce}:{self.qop}:"
        response = _hex(f"{_hex(a1)}:{tail}{_hex(f'AUTHENTICATE:{self.digest_uri}{layer}'.encode())}"
                        .encode())
        self.expected_rspauth = _hex(
            f"{_hex(a1)}:{tail}{_hex(f':{self.digest_uri}{layer}'.encode())}".encode())
        parts = [f'username="{self.username}"', f'realm="{realm}"' if realm else "",
                 f'nonce="{nonce}"', f"nc={nc}", f'cnonce="{self.cnonce}"',
                 f'digest-uri="{self.digest_uri}"', "maxbuf=65536", f"response={response}",
                 f"qop={self.qop}"]
        if self.qop == "auth-conf":
            self.cipher = next(c for c in RC4_KEY_BYTES if c in ciphers)
            parts.append(f"cipher={self.cipher}")
        if d.get("charset") == "utf-8":
            parts.insert(0, "charset=utf-8")
        return ",".join(p for p in parts if p).encode()

    def check_rspauth(self, final: bytes) -> None:
        """The server proves it knows the password too (mutual authentication); then the
        security layer's keys are made (RFC 2831 2.3 and 2.4)."""
        got = parse_directives(final).get("rspauth", "") if final else ""
        if got != self.expected_rspauth:
            raise AMError("the RM's SASL rspauth does not match: not the RM that minted "
                          "this token")
        if self.qop == "auth":
            return

        def key(*parts: bytes) -> bytes:
            return hashlib.md5(b"".join(parts)).digest()

        self.ki_out = key(self.ha1, b"Digest session key to client-to-server signing key "
                          b"magic constant")
        self.ki_in = key(self.ha1, b"Digest session key to server-to-client signing key "
                         b"magic constant")
        if self.qop == "auth-conf":
            n = RC4_KEY_BYTES[self.cipher]
            self.rc4_out = RC4(key(self.ha1[:n], b"Digest H(A1) to client-to-server sealing "
                                   b"key magic constant"))
            self.rc4_in = RC4(key(self.ha1[:n], b"Digest H(A1) to server-to-client sealing "
                                  b"key magic constant"))

    @property
    def wraps(self) -> bool:
        return self.qop != "auth"

    def wrap(self, message: bytes) -> bytes:
        seq = struct.pack(">I", self.seq_out)
        self.seq_out += 1
        mac = hmac.new(self.ki_out, seq + message, hashlib.md5).digest()[:10]
        body = message + mac
        if self.rc4_out is not None:
            body = self.rc4_out.apply(body)
        return body + b"\x00\x01" + seq

    def unwrap(self, token: bytes) -> bytes:
        if len(token) < 16 or token[-6:-4] != b"\x00\x01":
            raise AMError("a malformed SASL-wrapped message from the RM")
        body, seq = token[:-6], token[-4:]
        if struct.unpack(">I", seq)[0] != self.seq_in:
            raise AMError("a SASL-wrapped message from the RM out of sequence")
        self.seq_in += 1
        if self.rc4_in is not None:
            body = self.rc4_in.apply(body)
        message, mac = body[:-10], body[-10:]
        if not hmac.compare_digest(
                mac, hmac.new(self.ki_in, seq + message, hashlib.md5).digest()[:10]):
            raise AMError("a SASL-wrapped message from the RM failed its integrity check")
        return message


# -- Hadoop RPC v9 ---------------------------------------------------------------------------


def request_header(call_id: int, client_id: bytes, retry: int) -> bytes:
    """RpcRequestHeaderProto: rpcKind=RPC_PROTOCOL_BUFFER, rpcOp=RPC_FINAL_PACKET."""
    return (field_varint(1, 2) + field_varint(2, 0) + field_varint(3, zigzag(call_id))
            + field_bytes(4, client_id) + field_varint(5, zigzag(retry)))


class RpcConnection:
    """One authenticated connection to the scheduler's ApplicationMasterProtocol."""

    def __init__(self, token: Token, address: tuple[str, int], timeout: float = 30.0) -> None:
        self.token, self.timeout = token, timeout
        self.client_id = uuid.uuid4().bytes
        self.call_id = 0
        self.lock = threading.Lock()
        self.layer: DigestMD5 | None = None  # SASL's integrity/privacy layer, when negotiated
        self.inbox = b""                     # unwrapped bytes not yet taken as frames
        where = f"{address[0]}:{address[1]}"
        try:
            self.sock = socket.create_connection(address, timeout=timeout)
        except OSError as exc:
            raise AMConnectionError(f"cannot reach the RM's scheduler at {where}: {exc}") \
                from None
        try:
            self.sock.sendall(b"hrpc" + bytes([9, 0, SASL_CALL_ID & 0xFF]))
            self._authenticate()
            self._send(request_header(CONTEXT_CALL_ID, self.client_id, -1),
                       field_bytes(3, PROTOCOL))  # IpcConnectionContextProto: no user (TOKEN)
        except (OSError, ValueError) as exc:
            self.close()
            raise AMConnectionError(f"the RM's scheduler at {where} broke the connection: "
                                    f"{exc}") from None
        except AMError:
            self.close()
            raise

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _send(self, header: bytes, *messages: bytes) -> None:
        body = delimited(header) + b"".join(delimited(m) for m in messages)
        frame = struct.pack(">I", len(body)) + body
        if self.layer is None:
            self.sock.sendall(frame)
            return
        # With integrity or privacy the stream travels in SASL WRAP messages, as Hadoop's
        # SaslRpcClient.WrappedOutputStream sends it (no more than the server's maxbuf each).
        step = max(256, self.layer.maxbuf - 64)
        for at in range(0, len(frame), step):
            sasl = field_varint(2, 5) + field_bytes(3, self.layer.wrap(frame[at:at + step]))
            outer = delimited(request_header(SASL_CALL_ID, b"", -1)) + delimited(sasl)
            self.sock.sendall(struct.pack(">I", len(outer)) + outer)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ValueError("the connection closed")
            buf += chunk
        return buf

    def _receive(self) -> tuple[Fields, bytes]:
        """(RpcResponseHeaderProto fields, the response message) of the next frame, unwrapped
        from SASL WRAP messages when a security layer was negotiated."""
        while True:
            if len(self.inbox) >= 4:
                (size,) = struct.unpack(">I", self.inbox[:4])
                if len(self.inbox) >= 4 + size:
                    frame, self.inbox = self.inbox[4:4 + size], self.inbox[4 + size:]
                    return self._parse(frame)
            (size,) = struct.unpack(">I", self._recv_exact(4))
            if size > MAX_FRAME:
                raise ValueError(f"a frame of {size} bytes")
            header, body = self._parse(self._recv_exact(size))
            sasl = decode(body) if self.layer is not None else {}
            if first_int(header, 1) != SASL_CALL_ID & 0xFFFFFFFF or first_int(sasl, 2) != 5:
                return header, body
            assert self.layer is not None
            self.inbox += self.layer.unwrap(first_bytes(sasl, 3))
            if len(self.inbox) > MAX_FRAME:
                raise ValueError("too much wrapped data")

    @staticmethod
    def _parse(frame: bytes) -> tuple[Fields, bytes]:
        hsize, pos = read_varint(frame, 0)
        header = decode(frame[pos:pos + hsize])
        pos += hsize
        body = b""
        if pos < len(frame):
            bsize, pos = read_varint(frame, pos)
            body = frame[pos:pos + bsize]
        if first_int(header, 2) != 0:  # ERROR or FATAL
            name = first_bytes(header, 4).decode(errors="replace")
            msg = first_bytes(header, 5).decode(errors="replace")
            raise AMError(f"{name}: {msg}" if msg else name)
        return header, body

    def _sasl(self, state: int, token: bytes = b"", auth: bytes = b"") -> Fields:
        message = field_varint(2, state) + (field_bytes(3, token) if token else b"") + (
            field_bytes(4, auth) if auth else b"")
        self._send(request_header(SASL_CALL_ID, b"", -1), message)
        _, body = self._receive()
        return decode(body)

    def _authenticate(self) -> None:
        offer = self._sasl(1)  # NEGOTIATE
        chosen: Fields | None = None
        for raw in offer.get(4, []):
            auth = decode(raw) if isinstance(raw, bytes) else {}
            if first_bytes(auth, 1) == b"TOKEN" and first_bytes(auth, 2) == b"DIGEST-MD5":
                chosen = auth
        if chosen is None:
            methods = [first_bytes(decode(a), 1).decode() for a in offer.get(4, [])
                       if isinstance(a, bytes)]
            raise AMError(f"the RM's scheduler offers no TOKEN/DIGEST-MD5 authentication "
                          f"(offers: {', '.join(methods) or 'none'})")
        digest = DigestMD5(base64.b64encode(self.token.identifier).decode(),
                           base64.b64encode(self.token.password).decode(),
                           first_bytes(chosen, 3).decode(), first_bytes(chosen, 4).decode())
        # The INITIATE names the chosen auth (without the challenge: the server made it).
        initiate = b"".join(field_bytes(n, first_bytes(chosen, n)) for n in (1, 2, 3, 4))
        reply = self._sasl(2, digest.respond(first_bytes(chosen, 5)), initiate)
        while first_int(reply, 2) == 3:  # CHALLENGE
            reply = self._sasl(4, digest.respond(first_bytes(reply, 3)))
        state = first_int(reply, 2)
        if state != 0:
            raise AMError(f"SASL ended in state {SASL_STATE.get(state, state)}, not SUCCESS")
        digest.check_rspauth(first_bytes(reply, 3))
        if digest.wraps:
            self.layer = digest

    def call(self, method: str, request: bytes) -> bytes:
        """One ApplicationMasterProtocol call; its response message, or AMError with the RM's
        exception class and message."""
        with self.lock:
            call_id, self.call_id = self.call_id, self.call_id + 1
            header = field_bytes(1, method) + field_bytes(2, PROTOCOL) + field_varint(3, 1)
            try:
                self.sock.settimeout(self.timeout)
                self._send(request_header(call_id, self.client_id, 0), header, request)
                _, body = self._receive()
            except (OSError, ValueError) as exc:
                raise AMConnectionError(f"{method}: the connection to the RM failed: {exc}") \
                    from None
            return body


def scheduler_addresses(token: Token, override: str = "") -> list[tuple[str, int]]:
    """Where the scheduler listens: ``override`` (host:port), else the token's service, which
    the RM sets to its scheduler address (a comma list with an HA pair)."""
    found = []
    for item in (override or token.service).split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            found.append((host.strip("[]"), int(port)))
    if not found:
        raise AMError(f"the AMRMToken's service {token.service!r} names no scheduler address")
    return found


# -- the ApplicationMaster --------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    queue: str
    max_memory_mb: int
    max_vcores: int


class ApplicationMaster:
    """Registers this container as its application's AM, heartbeats, and finishes.

    ``on_shutdown`` is called (from the heartbeat thread) with the reason when the RM answers
    AM_SHUTDOWN or the attempt is gone: the application is over and the kernel must end.
    """

    def __init__(self, token: Token, addresses: list[tuple[str, int]],
                 heartbeat: float = 10.0, timeout: float = 30.0) -> None:
        self.token, self.addresses = token, addresses
        self.heartbeat, self.timeout = heartbeat, timeout
        self.conn: RpcConnection | None = None
        self.response_id = 0
        self.registered: tuple[str, int, str] | None = None
        self.finished = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_environment(cls, env: dict[str, str]) -> ApplicationMaster | None:
        """The AM of this YARN container (CONTAINER_ID and HADOOP_TOKEN_FILE_LOCATION set by
        the NodeManager), or None when this is not a YARN container."""
        path = env.get("HADOOP_TOKEN_FILE_LOCATION", "")
        if not env.get("CONTAINER_ID") or not path:
            return None
        token = amrm_token(path)
        beat = float(env.get("POOLGATE_AM_HEARTBEAT", "") or 10.0)
        return cls(token, scheduler_addresses(token, env.get("POOLGATE_AM_SCHEDULER", "")),
                   heartbeat=max(0.05, beat))

    def _connection(self) -> RpcConnection:
        if self.conn is None:
            errors = []
            for address in self.addresses:  # an HA pair: the active one answers
                try:
                    self.conn = RpcConnection(self.token, address, self.timeout)
                    break
                except AMError as exc:
                    errors.append(str(exc))
            if self.conn is None:
                raise AMError("; ".join(errors))
        return self.conn

    def _call(self, method: str, request: bytes) -> bytes:
        """One call; a broken connection (the server closes idle ones, an HA failover) is
        opened again and the call sent once more."""
        for tries_left in (1, 0):
            conn = self._connection()
            try:
                return conn.call(method, request)
            except AMConnectionError:
                conn.close()
                self.conn = None
                if not tries_left:
                    raise
        raise AssertionError("unreachable")

    def register(self, host: str, rpc_port: int = -1, tracking_url: str = "") -> Registration:
        """registerApplicationMaster; AMError with the RM's reason when it refuses."""
        request = field_bytes(1, host) + field_varint(2, rpc_port) + (
            field_bytes(3, tracking_url) if tracking_url else b"")
        answer = decode(self._call("registerApplicationMaster", request))
        self.registered, self.response_id = (host, rpc_port, tracking_url), 0
        most = decode(first_bytes(answer, 1))  # ResourceProto: memory=1, virtual_cores=2
        return Registration(first_bytes(answer, 5).decode(), first_int(most, 1),
                            first_int(most, 2))

    def allocate(self, progress: float = 0.0) -> int:
        """One heartbeat (asks for nothing); the RM's AM command (0, AM_RESYNC, AM_SHUTDOWN)."""
        request = field_varint(4, self.response_id) + field_float(5, progress)
        answer = decode(self._call("allocate", request))
        self.response_id = first_int(answer, 2, self.response_id)
        return first_int(answer, 1)

    def finish(self, status: str, diagnostics: str = "", tracking_url: str = "") -> bool:
        """finishApplicationMaster with a final status (SUCCEEDED, FAILED, KILLED); True once
        the RM says the AM is unregistered (it may answer False while it saves the state)."""
        self.stop_heartbeat()
        request = field_bytes(1, diagnostics[-4000:]) + (
            field_bytes(2, tracking_url) if tracking_url else b"") + field_varint(
            3, FINAL_STATUS[status])
        for _ in range(20):
            if first_int(decode(self._call("finishApplicationMaster", request)), 1):
                self.finished = True
                return True
            time.sleep(0.1)
        return False

    def start_heartbeat(self, on_shutdown: Callable[[str], None]) -> None:
        """Heartbeat every ``heartbeat`` seconds in a thread until finish or stop_heartbeat."""
        def loop() -> None:
            failures = 0
            while not self._stop.wait(self.heartbeat):
                try:
                    command = self.allocate()
                    failures = 0
                except AMError as exc:
                    if "ApplicationMasterNotRegisteredException" in str(exc):
                        command = AM_RESYNC  # an RM that restarted: "AM should re-register"
                    elif "ApplicationAttemptNotFoundException" in str(exc) or \
                            "InvalidApplicationMasterRequestException" in str(exc):
                        on_shutdown(f"the RM no longer knows this attempt: {exc}")
                        return
                    else:
                        failures += 1
                        log.warning("AM heartbeat %d failed: %s", failures, exc)
                        continue
                if command == AM_SHUTDOWN:
                    on_shutdown("the ResourceManager told the AM to shut down")
                    return
                if command == AM_RESYNC and self.registered is not None:
                    log.warning("the ResourceManager asked the AM to register again")
                    try:
                        self.register(*self.registered)
                    except AMError as exc:
                        on_shutdown(f"registering again after AM_RESYNC failed: {exc}")
                        return

        self._thread = threading.Thread(target=loop, daemon=True, name="yarn-am-heartbeat")
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout + 1)

    def close(self) -> None:
        self.stop_heartbeat()
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def main() -> int:  # pragma: no cover - a manual probe
    """``python -m poolgate.yarn_am``: register, one heartbeat, finish (a smoke test in a
    container with ``HADOOP_TOKEN_FILE_LOCATION``)."""
    logging.basicConfig(level=logging.INFO)
    am = ApplicationMaster.from_environment(dict(os.environ))
    if am is None:
        print("not a YARN container (no CONTAINER_ID / HADOOP_TOKEN_FILE_LOCATION)")
        return 2
    print(am.register(socket.gethostname()))
    print("command", am.allocate())
    print("finished", am.finish("SUCCEEDED", "poolgate.yarn_am probe"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
