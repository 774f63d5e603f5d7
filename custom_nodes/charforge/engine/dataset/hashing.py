"""Perceptual hashes and duplicate grouping.

Two 64-bit hashes of the grey image, both robust to resizing and recompression:

- **dHash** (difference hash): shrink to 9x8, one bit per horizontal neighbour pair, set where the left
  pixel is brighter. Cheap and good at re-encodes and small edits.
- **pHash** (perceptual hash): shrink to 32x32, 2-D DCT, keep the 8x8 lowest frequencies (without the
  DC term's influence on the threshold), one bit per coefficient above their median. Robust to blur,
  gamma and mild colour changes.

Two photos are near duplicates when the Hamming distance between their hashes (bits that differ, 0..64)
is at or below a threshold; a few bits is a re-encode or resize, above ~12 is usually a different photo.
"""

from __future__ import annotations

from collections.abc import Sequence

from ...deps import require

HASH_BITS = 64


def _grey(image):
    np = require("numpy")
    cv2 = require("cv2")
    array = np.asarray(image)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)
    return array


def _bits_to_hex(bits) -> str:
    np = require("numpy")
    packed = np.packbits(np.asarray(bits, dtype=np.uint8).ravel())
    return packed.tobytes().hex()


def dhash(image) -> str:
    """Difference hash of a grey or RGB uint8 image, as 16 hex digits."""
    cv2 = require("cv2")
    small = cv2.resize(_grey(image), (9, 8), interpolation=cv2.INTER_AREA).astype("int16")
    return _bits_to_hex(small[:, :-1] > small[:, 1:])


def phash(image) -> str:
    """DCT perceptual hash of a grey or RGB uint8 image, as 16 hex digits."""
    np = require("numpy")
    cv2 = require("cv2")
    small = cv2.resize(_grey(image), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    # The DC coefficient is the mean brightness: leave it out of the median so it cannot skew the split.
    median = np.median(low.ravel()[1:])
    return _bits_to_hex(low > median)


def hex_to_int(value: str) -> int:
    return int(value, 16)


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex hashes."""
    return (hex_to_int(a) ^ hex_to_int(b)).bit_count()


def _popcount(values, np):
    # numpy < 2.0 has no bitwise_count: count the bits of each byte through a table.
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    as_bytes = values.view(np.uint8).reshape(values.shape + (8,))
    return table[as_bytes].sum(axis=-1)


def group_near_duplicates(
    hashes: Sequence[Sequence[str]], threshold: int, block: int = 2048
) -> list[list[int]]:
    """Groups (lists of indices, each sorted, at least 2 long) of items whose hashes are within `threshold`.

    `hashes[i]` holds one hash per kind for item i (e.g. ``[phash, dhash]``); two items match when every
    kind is within the threshold. Matching is transitive (A~B and B~C puts A, B, C in one group). The
    distance matrix is computed in blocks of `block` rows, so memory stays bounded for large datasets.
    """
    np = require("numpy")
    count = len(hashes)
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if count < 2:
        return []
    kinds = len(hashes[0])
    columns = [np.array([hex_to_int(item[k]) for item in hashes], dtype=np.uint64) for k in range(kinds)]
    for start in range(0, count, block):
        stop = min(start + block, count)
        close = None
        for values in columns:
            xor = values[start:stop, None] ^ values[None, :]
            bits = np.bitwise_count(xor) if hasattr(np, "bitwise_count") else _popcount(xor, np)
            within = bits <= threshold
            close = within if close is None else close & within
        rows, cols = np.nonzero(close)
        for row, col in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + row
            if col > i:
                a, b = find(i), find(col)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(find(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]
