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


def test_values_of_and_value_dict_read_the_same_through_the_public_api(monkeypatch):
    ds = dcmread(io.BytesIO(to_part10(sr_report())))
    ds.PatientName  # converted; the rest stays raw
    keys = [0x00100010, 0x00080016, 0x7FE00010]  # converted, raw, absent

    def raw(owner, tag, elem):
        assert owner is ds
        return ("raw", int(tag))

    fast = _pydicom.values_of(ds, keys, raw)
    with pytest.raises(AttributeError):
        _pydicom.value_dict(ds)
    converted = Dataset()
    converted.PatientID = "X"
    converted.Modality = "SR"
    fast_dict = _pydicom.value_dict(converted)
    monkeypatch.setattr(_pydicom, "MISSING", ("Dataset._dict",))
    assert _pydicom.values_of(ds, keys, raw) == fast == [ds.PatientName, ("raw", 0x00080016),
                                                         None]
    with pytest.raises(AttributeError):
        _pydicom.value_dict(ds)
    assert _pydicom.value_dict(converted) == fast_dict == {0x00100020: "X", 0x00080060: "SR"}


def test_code_values_reads_a_coded_entry_or_steps_aside(monkeypatch):
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121071", "DCM", "Finding"
    partial = Dataset()
    partial.CodeValue = "121071"
    tags = (0x00080100, 0x00080102, 0x00080104)
    raw = dcmread(io.BytesIO(to_part10(sr_report())))  # its elements not converted yet
    fast = [_pydicom.code_values(ds, *tags) for ds in (code, partial, raw)]
    monkeypatch.setattr(_pydicom, "MISSING", ("Dataset._dict",))
    public = [_pydicom.code_values(ds, *tags) for ds in (code, partial, raw)]
    assert fast == public == [("121071", "DCM", "Finding"), None, None]
