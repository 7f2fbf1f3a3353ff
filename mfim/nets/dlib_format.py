"""dlib's serialization primitives (dlib/serialize.h), read from bytes: the encoding of its .dat model files.

Integers are one control byte (low nibble: byte count, 0x80: negative) and the little-endian magnitude; floats an
(integer mantissa, integer exponent) pair; strings a length and the bytes; bools the characters '0' / '1'. Used by
the face-recognition ResNet (mfim.nets.dlib_resnet) and the shape predictor's mean shape (mfim.nets.landmarks).
"""

from __future__ import annotations

import numpy as np


class DlibFormatError(ValueError):
    """The file is not the dlib model the reader expected (a truncated file, another format or network)."""


class Reader:
    """Sequential reader of dlib's serialize() encoding over ``data`` (``name`` heads every error)."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.pos = 0
        self.name = name

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.name}: {what} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"file ends while reading {n} bytes")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise self.fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def string(self) -> str:
        n = self.integer()
        if not 0 <= n <= 256:
            raise self.fail(f"implausible string length {n}")
        return self.take(n).decode("ascii", errors="replace")

    def real(self) -> float:
        if self.data[self.pos] & 0x70:
            raise self.fail("old ASCII float format (not supported)")
        mantissa, exponent = self.integer(), self.integer()
        if exponent >= 32000:
            return {32000: np.inf, 32001: -np.inf}.get(exponent, np.nan)
        return float(np.ldexp(np.float64(mantissa), exponent))

    def boolean(self) -> bool:
        byte = self.take(1)
        if byte not in (b"0", b"1"):
            raise self.fail(f"bad bool byte {byte!r}")
        return byte == b"1"

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise self.fail(f"tensor version {version} (expected 2)")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32).reshape(shape)

    def alias_shape(self) -> tuple[int, ...]:
        version = self.integer()
        if version != 1:
            raise self.fail(f"alias_tensor version {version} (expected 1)")
        return tuple(self.integer() for _ in range(4))

    def expect(self, value, what: str):
        got = self.integer()
        if got != value:
            raise self.fail(f"{what} = {got}, expected {value}")
