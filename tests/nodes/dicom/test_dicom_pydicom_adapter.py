"""The pydicom adapter: its internals are there on the pinned pydicom, its check notices
one that is gone, and its public fall-backs read what the internals read."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from nodes.dicom import _pydicom
from support.synth import sr_report, to_part10


def test_the_pinned_pydicom_has_every_internal_the_adapter_relies_on():
    assert _pydicom.MISSING == ()


def test_the_check_names_an_internal_that_is_gone(monkeypatch):
    monkeypatch.delattr(Dataset, "_character_set")
    assert _pydicom._check() == ("Dataset._character_set",)


def test_the_public_fallbacks_read_what_the_internals_read():
    report = sr_report()
    report.SpecificCharacterSet = "ISO_IR 192"
    ds = dcmread(io.BytesIO(to_part10(report)))  # elements raw until read
    fast, public = _pydicom.element_dict(ds), _pydicom._public_dict(ds)
    assert list(fast) == list(public) and all(fast[t] is public[t] for t in fast)
    assert any(type(e) is RawDataElement for e in fast.values())
    ds.PatientName  # converts that one element
    name = fast[0x00100010]
    assert _pydicom.value(name) == _pydicom._public_value(name) == ds.PatientName
    raw = next(e for e in fast.values() if type(e) is RawDataElement)
    with pytest.raises(AttributeError):
        _pydicom.value(raw)
    with pytest.raises(AttributeError):
        _pydicom._public_value(raw)
    assert _pydicom.character_set(ds) == _pydicom._public_character_set(ds) == ["UTF8"]
    assert _pydicom._public_character_set(Dataset()) == _pydicom.character_set(Dataset())
