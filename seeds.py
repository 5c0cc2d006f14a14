"""Generators seeded by keys: the toolkit's one way to turn a seed into random draws.

torch's CPU generator (mt19937) keeps only the low 32 bits of `manual_seed`'s argument, so a seed built as
`seed * 2**32 + k` forgets `seed`, and one with `+ 2**60` added is the generator without it. Here a key, a
tuple such as ("sample", seed, k, stream), is hashed with SHAKE-256 (Python's hashlib: the same bytes on every
machine and version) into the CPU generator's whole state, 624 words of 32 bits, so distinct keys give
independent draws for any non-negative integers below 2^64 in any position. A CUDA (or other device) generator is
Philox, seeded with 63 bits of the same hash. NumPy generators take 128 bits of it as their entropy.

Keys are encoded one element after another, each with its type and width fixed (a string with its length, an
integer as 8 bytes), so no two different keys encode alike: ("sample", 0, 2**32) and ("sample", 2**32, 0) differ.

Whoever draws names what the draw is for in the key's first element, so draws for different purposes never share
a stream: 'sample' (sample k's noise, label, condition and injected noise, one stream each; flows/solvers.py),
'train' (the randomness of training micro-step k; train.py), 'order' (the data order of an epoch; data/), ...
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

MT_WORDS = 624  # mt19937's state
# torch's CPU generator state (ATen's CPUGeneratorImplState): the initial seed (8 bytes), left and seeded (4 + 4),
# next (8), then the 624 state words, each stored in 8 bytes, then the cached normal draws. Checked by
# tests/test_seeds.py against torch's own seeding.
_WORDS_AT = 24
_template: bytes | None = None


def _encode(key: tuple) -> bytes:
    parts = []
    for part in key:
        if isinstance(part, str):
            text = part.encode()
            parts.append(b"s" + struct.pack("<I", len(text)) + text)
        elif isinstance(part, (int, np.integer)) and not isinstance(part, bool) and 0 <= int(part) < 2**64:
            parts.append(b"i" + struct.pack("<Q", int(part)))
        else:
            raise ValueError(f"a seed key holds strings and integers in [0, 2^64), got {part!r} in {key}")
    return b"".join(parts)


def digest(*key, size: int = 8) -> bytes:
    """`size` bytes of SHAKE-256 of the key's encoding."""
    return hashlib.shake_256(_encode(key)).digest(size)


def _cpu_state(words: np.ndarray, initial_seed: int) -> torch.Tensor:
    """The CPU generator's state with the given 624 mt19937 words, as torch's manual_seed leaves it otherwise: the
    state is twisted before the first draw and no normal draw is cached."""
    global _template
    if _template is None:
        _template = bytes(torch.Generator().manual_seed(0).get_state().numpy())
    state = bytearray(_template)
    state[:8] = struct.pack("<Q", initial_seed)
    state[_WORDS_AT: _WORDS_AT + 8 * MT_WORDS] = words.astype("<u8").tobytes()
    return torch.frombuffer(state, dtype=torch.uint8).clone()


def generator(*key, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` whose draws depend on the whole key (strings and integers in [0, 2^64))."""
    device = torch.device(device)
    if device.type != "cpu":  # Philox: a 64-bit seed, kept whole
        return torch.Generator(device).manual_seed(int.from_bytes(digest(*key), "little") >> 1)
    raw = digest(*key, size=4 * MT_WORDS)
    words = np.frombuffer(raw, dtype="<u4")
    g = torch.Generator()
    g.set_state(_cpu_state(words, int.from_bytes(raw[:8], "little")))
    return g


def numpy_generator(*key) -> np.random.Generator:
    """A NumPy generator whose draws depend on the whole key (SeedSequence of 128 bits of its hash)."""
    return np.random.default_rng(int.from_bytes(digest(*key, size=16), "little"))

