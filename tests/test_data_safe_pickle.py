"""The refer pickles are untrusted: only plain data loads; py2 protocol-2 pickles load with str."""
from __future__ import annotations

import os
import pickle

import pytest

from distill.data.safe_pickle import UnsafePickleError, safe_load, safe_loads


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_reduce_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps([{"ref_id": 1, "x": _Exploit(marker)}], protocol=2)
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        safe_loads(data)
    assert not marker.exists()
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p"):
        safe_load(path)


def test_non_builtin_classes_are_refused():
    import collections
    with pytest.raises(UnsafePickleError, match="OrderedDict"):
        safe_loads(pickle.dumps(collections.OrderedDict(a=1), protocol=2))


def _py2_refs_pickle() -> bytes:
    """Bytes as Python 2.7's cPickle.dump(refs, f, 2) writes them: py2 `str` as SHORT_BINSTRING ('U'),
    unicode as BINUNICODE ('X'), ints as BININT1 ('K'), floats as BINFLOAT ('G')."""
    import struct

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b
    out = b"\x80\x02" + b"]" + b"(" + b"}" + b"("
    out += s(b"ref_id") + b"K\x07"
    out += s(b"file_name") + s(b"COCO_train2014_000000000009_5.jpg")
    out += s(b"split") + s(b"testA")
    out += s(b"raw") + s(b"caf\xe9 table")          # latin-1 byte string, not valid UTF-8
    out += s(b"score") + b"G" + struct.pack(">d", 0.5)
    out += s(b"sentences") + b"]" + b"(" + b"}" + b"(" + s(b"sent") + b"X" + struct.pack("<I", 9) + b"left bird"
    out += s(b"tokens") + b"]" + b"(" + s(b"left") + s(b"bird") + b"e" + b"u" + b"e"
    out += s(b"bbox") + b"(" + b"K\x01" + b"K\x02" + b"t"
    out += b"u" + b"e" + b"."
    return out


def test_python2_protocol2_pickle_loads_with_str(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(_py2_refs_pickle())
    refs = safe_load(path)
    assert refs == [{"ref_id": 7, "file_name": "COCO_train2014_000000000009_5.jpg", "split": "testA",
                     "raw": "caf\xe9 table", "score": 0.5,
                     "sentences": [{"sent": "left bird", "tokens": ["left", "bird"]}], "bbox": (1, 2)}]
    assert all(isinstance(k, str) for k in refs[0])


def test_python3_protocol2_bytes_and_sets_load():
    obj = [{"a": b"raw-bytes", "b": {1, 2}, "c": (1.5, None, True)}]
    data = pickle.dumps(obj, protocol=2)
    assert b"_codecs" in data  # protocol 2 spells bytes through _codecs.encode
    assert safe_loads(data) == [{"a": "raw-bytes", "b": {1, 2}, "c": (1.5, None, True)}]
    assert safe_loads(data, decode_bytes=False)[0]["a"] == b"raw-bytes"
