"""Built-in handlers: SR report → ORU^R01 and study notices, validated by hl7apy (strict)."""

from __future__ import annotations

import os
import sys

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from nodes.hl7 import Handler, Message, SRReportHandler, StudyNoticeHandler, parse
from nodes.hl7.handlers import MissingPatientID
from support.synth import CANARY, CANARY_ID, ct, mr

sys.path.insert(0, os.path.dirname(__file__))  # the helpers next to this file
import hl7_samples as samples  # noqa: E402

FIXED = dict(clock=lambda: samples.FIXED_NOW, control_ids=lambda: "CTRL0001")


def sr_handler() -> SRReportHandler:
    return SRReportHandler(samples.RIS, **FIXED)


def strict(message: Message):
    """Parse the encoded bytes back (in MSH-18's codec) and validate strictly as 2.5.1."""
    data = message.encode()
    text = data.decode(message.codec)
    parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.validate() is True
    assert parsed.msh.msh_12.value == "2.5.1"
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    return parsed


def obx_rows(message: Message) -> list[tuple[str, str, str, str]]:
    """(OBX-2, OBX-3.1, OBX-4, OBX-5 as ER7) of every OBX."""
    from nodes.hl7.model import field_er7

    return [(o.get(2), o.get(3), o.get(4), field_er7(o[5])) for o in message.all("OBX")]


GOLDEN_COMPREHENSIVE = "\r".join([
    "MSH|^~\\&|DICOMFLOW|SITE-A|RIS|HOSP|20260102030405+0000||ORU^R01^ORU_R01|CTRL0001|P|2.5.1",
    "PID|1||CANARYID-4242^^^HOSP-A||Zzcanary^Phiprobe||19700101|O",
    "ORC|SC|PLACER-7|FILLER-9||CM",
    "OBR|1|PLACER-7|FILLER-9|24627-2^CT Chest^LN|||20260101101500|||||||||||ACC0001|RP-55|||"
    "20260101103000|||F|||||||RAD42&Radiologist&Rita&M&PhD&Dr.",
    "OBX|1|CE|121049^Language of Content Item and Descendants^DCM|1|"
    "en-US^English (United States)^RFC5646||||||F",
    "OBX|2|XPN|121008^Person Observer Name^DCM|2|Observer^Olga||||||F",
    "OBX|3||121070^Findings^DCM|3|||||||F",
    "OBX|4|TX|121071^Finding^DCM|3.1|Pipe \\F\\ caret \\S\\ amp \\T\\ tilde \\R\\ backslash "
    "\\E\\ end.~Second line.||||||F",
    "OBX|5||125007^Measurement Group^DCM|3.2|||||||F",
    "OBX|6|NM|410668003^Length^SCT|3.2.1|12.5|mm^millimeter^UCUM|||||F",
    "OBX|7|NM|118565006^Volume^SCT|3.2.2|1500|mm3^cubic millimeter^UCUM|||||F",
    "OBX|8|CE|121071^Finding^DCM|3.2.3|RID3874^Nodule^RADLEX||||||F",
    "OBX|9|DTM|111526^DateTime Started^DCM|3.3|20260101101500.5+0100||||||F",
    "OBX|10|DT|111060^Study Date^DCM|3.4|20251231||||||F",
    "OBX|11|TM|111061^Study Time^DCM|3.5|1015||||||F",
    "OBX|12|XPN|121008^Person Observer Name^DCM|3.6|Second^Sam^^Jr.^Dr.||||||F",
    "OBX|13|ST|110180^Study Instance UID^DCM|3.7|1.2.826.0.1.3680043.10.1234.9||||||F",
    "OBX|14||121072^Impressions^DCM|4|||||||F",
    "OBX|15|TX|121073^Impression^DCM|4.1|No acute disease.||||||F",
    "OBX|16|ST|113014^DICOM Study^DCM||1.2.826.0.1.3680043.10.1234.3.1||||||F",
    "OBX|17|ST|112002^Series Instance UID^DCM||1.2.826.0.1.3680043.10.1234.3.2||||||F",
    "OBX|18|ST|SOPInstanceUID^SOP Instance UID^99DCMFLOW||1.2.826.0.1.3680043.10.1234.3.3||||||F",
    "OBX|19|ST|110181^SOP Class UID^DCM||1.2.840.10008.5.1.4.1.1.88.33||||||F",
]) + "\r"


def test_golden_comprehensive_sr_to_oru():
    message = sr_handler().handle(samples.comprehensive(verification="VERIFIED"))
    assert message.to_er7() == GOLDEN_COMPREHENSIVE
    assert message.encode() == GOLDEN_COMPREHENSIVE.encode("ascii")
    strict(message)


GOLDEN_BASIC_TEXT = "\r".join([
    "MSH|^~\\&|DICOMFLOW|SITE-A|RIS|HOSP|20260102030405+0000||ORU^R01^ORU_R01|CTRL0001|P|2.5.1",
    "PID|1||CANARYID-4242^^^HOSP-A||Zzcanary^Phiprobe||19700101|O",
    "ORC|SC|PLACER-7|FILLER-9||CM",
    "OBR|1|PLACER-7|FILLER-9|24627-2^CT Chest^LN|||20260101101500|||||||||||ACC0001|RP-55|||"
    "20260101103000|||P|||||||&Observer&Olga",
    "OBX|1|CE|121049^Language of Content Item and Descendants^DCM|1|"
    "en-US^English (United States)^RFC5646||||||P",
    "OBX|2|XPN|121008^Person Observer Name^DCM|2|Observer^Olga||||||P",
    "OBX|3||121070^Findings^DCM|3|||||||P",
    "OBX|4|TX|121071^Finding^DCM|3.1|Pipe \\F\\ caret \\S\\ amp \\T\\ tilde \\R\\ backslash "
    "\\E\\ end.~Second line.||||||P",
    "OBX|5|DT|111060^Study Date^DCM|3.2|20251231||||||P",
    "OBX|6|ST|110180^Study Instance UID^DCM|3.3|1.2.826.0.1.3680043.10.1234.9||||||P",
    "OBX|7||121072^Impressions^DCM|4|||||||P",
    "OBX|8|TX|121073^Impression^DCM|4.1|No acute disease.||||||P",
    "OBX|9|ST|113014^DICOM Study^DCM||1.2.826.0.1.3680043.10.1234.1.1||||||P",
    "OBX|10|ST|112002^Series Instance UID^DCM||1.2.826.0.1.3680043.10.1234.1.2||||||P",
    "OBX|11|ST|SOPInstanceUID^SOP Instance UID^99DCMFLOW||1.2.826.0.1.3680043.10.1234.1.3||||||P",
    "OBX|12|ST|110181^SOP Class UID^DCM||1.2.840.10008.5.1.4.1.1.88.11||||||P",
]) + "\r"

# Enhanced SR, patient name in ISO_IR 100: MSH-18 8859/1 and the bytes in ISO-8859-1.
GOLDEN_ENHANCED_LATIN1 = "\r".join([
    "MSH|^~\\&|DICOMFLOW|SITE-A|RIS|HOSP|20260102030405+0000||ORU^R01^ORU_R01|CTRL0001|P|2.5.1"
    "||||||8859/1",
    "PID|1||CANARYID-4242^^^HOSP-A||Müller^Jörg||19700101|O",
    "ORC|SC|PLACER-7|FILLER-9||CM",
    "OBR|1|PLACER-7|FILLER-9|24627-2^CT Chest^LN|||20260101101500|||||||||||ACC0001|RP-55|||"
    "20260101103000|||P|||||||&Observer&Olga",
    "OBX|1|XPN|121008^Person Observer Name^DCM|1|Observer^Olga||||||P",
    "OBX|2||121070^Findings^DCM|2|||||||P",
    "OBX|3|NM|410668003^Length^SCT|2.1|12.5|mm^millimeter^UCUM|||||P",
    "OBX|4|TM|111061^Study Time^DCM|2.2|101500.1234||||||P",
    "OBX|5|TX|121071^Finding^DCM|2.3|Nodule in the right upper lobe.||||||P",
    "OBX|6|ST|113014^DICOM Study^DCM||1.2.826.0.1.3680043.10.1234.2.1||||||P",
    "OBX|7|ST|112002^Series Instance UID^DCM||1.2.826.0.1.3680043.10.1234.2.2||||||P",
    "OBX|8|ST|SOPInstanceUID^SOP Instance UID^99DCMFLOW||1.2.826.0.1.3680043.10.1234.2.3||||||P",
    "OBX|9|ST|110181^SOP Class UID^DCM||1.2.840.10008.5.1.4.1.1.88.22||||||P",
]) + "\r"


def test_golden_basic_text_sr_to_oru():
    message = sr_handler().handle(samples.basic_text())
    assert message.to_er7() == GOLDEN_BASIC_TEXT
    strict(message)


def test_golden_enhanced_sr_with_a_latin1_name_to_oru():
    ds = roundtrip(samples.enhanced(name="Müller^Jörg", charset="ISO_IR 100"))
    message = sr_handler().handle(ds)
    assert message.encode() == GOLDEN_ENHANCED_LATIN1.encode("iso-8859-1")
    strict(message)


def test_basic_text_sr_maps_text_code_date_pname_uidref_and_nesting():
    message = sr_handler().handle(samples.basic_text())
    parsed = strict(message)
    assert obx_rows(message)[:8] == [
        ("CE", "121049", "1", "en-US^English (United States)^RFC5646"),
        ("XPN", "121008", "2", "Observer^Olga"),
        ("", "121070", "3", ""),
        ("TX", "121071", "3.1", "Pipe \\F\\ caret \\S\\ amp \\T\\ tilde \\R\\ backslash \\E\\ end."
                                "~Second line."),
        ("DT", "111060", "3.2", "20251231"),
        ("ST", "110180", "3.3", "1.2.826.0.1.3680043.10.1234.9"),
        ("", "121072", "4", ""),
        ("TX", "121073", "4.1", "No acute disease."),
    ]
    obr = message.segment("OBR")
    assert obr.get(25) == "P" and obr.get(3) == "FILLER-9" and obr.get(18) == "ACC0001"
    assert obr.get(19) == "RP-55" and obr.get(4) == "24627-2"
    # unverified: the observer context names the interpreter
    assert obr.get(32, 1, 2) == "Observer" and obr.get(32, 1, 3) == "Olga"
    assert parsed.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7() == \
        "CANARYID-4242^^^HOSP-A"


def test_enhanced_sr_maps_num_with_units_and_time():
    message = sr_handler().handle(samples.enhanced())
    strict(message)
    rows = obx_rows(message)
    assert ("NM", "410668003", "2.1", "12.5") in rows
    assert ("TM", "111061", "2.2", "101500.1234") in rows
    nm = next(o for o in message.all("OBX") if o.get(2) == "NM")
    assert (nm.get(6, 1), nm.get(6, 2), nm.get(6, 3)) == ("mm", "millimeter", "UCUM")


def test_every_obx_carries_the_result_status_and_uid_obxs_close_the_report():
    message = sr_handler().handle(samples.comprehensive(completion="PARTIAL"))
    assert {o.get(11) for o in message.all("OBX")} == {"P"}
    tail = [(o.get(3), o.get(5)) for o in message.all("OBX")[-4:]]
    ds = samples.comprehensive()
    assert tail == [("113014", ds.StudyInstanceUID), ("112002", ds.SeriesInstanceUID),
                    ("SOPInstanceUID", ds.SOPInstanceUID), ("110181", ds.SOPClassUID)]
    assert [o.get(1) for o in message.all("OBX")] == [str(i) for i in range(1, 20)]


def test_latin1_name_comes_out_in_8859_1():
    ds = samples.basic_text(name="Müller^Jörg", charset="ISO_IR 100")
    ds = roundtrip(ds)  # through Part 10 bytes: the name is encoded in Latin-1 and read back
    message = sr_handler().handle(ds)
    assert message.charset == "8859/1"
    data = message.encode()
    assert b"M\xfcller^J\xf6rg" in data and "Müller".encode() not in data
    assert parse(data).segment("PID").get(5) == "Müller"
    strict(message)


def test_utf8_name_with_ideographic_and_phonetic_groups():
    ds = samples.basic_text(name="Yamada^Tarou=山田^太郎=やまだ^たろう", charset="ISO_IR 192")
    ds = roundtrip(ds)
    message = sr_handler().handle(ds)
    assert message.charset == "UNICODE UTF-8"
    data = message.encode()
    assert "山田^太郎^^^^^^I".encode() in data
    pid5 = parse(data).segment("PID")[5]
    assert [rep[0] for rep in pid5] == ["Yamada", "山田", "やまだ"]
    assert [rep[7] for rep in pid5] == ["A", "I", "P"]
    strict(message)


def test_name_outside_the_declared_repertoire_switches_to_utf8():
    ds = samples.basic_text(name="Ωmega^Zoë", charset="ISO_IR 100")
    message = sr_handler().handle(ds)
    assert message.charset == "UNICODE UTF-8"
    assert "Ωmega".encode() in message.encode()


def roundtrip(ds):
    import io

    from pydicom import dcmread

    from support.synth import to_part10

    return dcmread(io.BytesIO(to_part10(ds)))


def test_non_sr_objects_are_skipped_by_the_sr_handler():
    assert sr_handler().handle(ct()) is None


def test_an_object_without_patient_id_cannot_make_an_oru():
    """PID-3 is required (hl7apy strict refuses a PID without it): the handler raises, so
    ToHL7 dead-letters the object instead of sending a result no RIS can file."""
    report = samples.enhanced()
    del report.PatientID
    with pytest.raises(MissingPatientID):
        sr_handler().handle(report)
    image = ct()
    del image.PatientID
    with pytest.raises(MissingPatientID):
        notice_handler().handle(image)


def test_control_ids_are_unique_and_fit_msh10():
    handler = SRReportHandler(samples.RIS)
    ids = {handler.handle(samples.enhanced()).control_id for _ in range(200)}
    assert len(ids) == 200 and all(len(i) <= 20 for i in ids)


def test_control_ids_never_repeat_in_a_process_and_differ_in_a_forked_child():
    from nodes.hl7.handlers import new_control_id

    ids = [new_control_id() for _ in range(10_000)]  # many in the same millisecond
    assert len(set(ids)) == len(ids) and all(len(i) == 19 for i in ids)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its next ID, then gone
        try:
            os.write(write, new_control_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        theirs = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(child, 0)
    ours = new_control_id()
    # the counter part: the child's was drawn again, not carried on from ours
    assert abs(int(theirs[-8:], 16) - int(ours[-8:], 16)) > 1


def test_report_without_request_falls_back_to_accession_and_document_title():
    ds = samples.enhanced()
    del ds.ReferencedRequestSequence
    message = sr_handler().handle(ds)
    obr = message.segment("OBR")
    assert obr.get(3) == "ACC0001" and obr.get(4) == "18748-4" and obr.get(2) == ""
    strict(message)


def test_fifty_item_report_validates():
    message = sr_handler().handle(samples.fifty_items())
    assert len(message.all("OBX")) == 54
    strict(message)


# -- study notices ------------------------------------------------------------------------


def notice_handler(state_dir=None, **kw) -> StudyNoticeHandler:
    return StudyNoticeHandler(samples.RIS, state_dir=state_dir, **FIXED, **kw)


def same_study(image):
    other = ct(study_uid=image.StudyInstanceUID)
    assert other.SOPInstanceUID != image.SOPInstanceUID
    return other


def test_study_notice_once_per_study():
    handler = notice_handler()
    first = ct()
    message = handler.handle(first)
    assert message is not None
    assert handler.handle(same_study(first)) is None
    # the announcing object itself is announced again (a retry must not be swallowed)
    assert handler.handle(first) is not None
    assert handler.handle(mr()) is not None  # another study
    assert handler.handle(samples.basic_text()) is None  # reports are not notices


def test_study_notice_once_per_study_across_a_restart(tmp_path):
    first, second = ct(), ct()
    before = notice_handler(tmp_path)
    assert before.handle(first) is not None
    # the process restarts: a new handler over the same state directory
    after = notice_handler(tmp_path)
    assert after.handle(same_study(first)) is None
    assert after.handle(first) is not None  # re-queued after a crash: announced again
    assert after.handle(second) is not None
    assert (tmp_path / "study-notices.txt").read_text().splitlines() == [
        f"{first.StudyInstanceUID} {first.SOPInstanceUID}",
        f"{second.StudyInstanceUID} {second.SOPInstanceUID}"]


def test_study_notice_state_survives_a_torn_last_line(tmp_path):
    first = ct()
    notice_handler(tmp_path).handle(first)
    with open(tmp_path / "study-notices.txt", "a") as out:
        out.write("1.2.3.4")  # the process died while writing the next line
    handler = notice_handler(tmp_path)
    assert handler.handle(same_study(first)) is None
    assert len(handler.announced) == 1


def test_study_notice_memory_is_bounded_and_the_file_compacted(tmp_path):
    handler = notice_handler(tmp_path, remember=3)
    images = [ct() for _ in range(7)]
    for image in images:
        assert handler.handle(image) is not None
    assert len(handler.announced) == 3
    lines = (tmp_path / "study-notices.txt").read_text().splitlines()
    assert len(lines) < 6  # rewritten when it reached twice `remember`
    again = notice_handler(tmp_path, remember=3)
    assert again.handle(same_study(images[-1])) is None  # the newest are kept
    assert len(again.announced) == 3


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_study_notice_refuses_an_object_without_real_uids():
    image = ct()
    image.StudyInstanceUID = "1.2.3 4\n5"
    with pytest.raises(ValueError) as raised:
        notice_handler().handle(image)
    assert type(raised.value).__name__ == "InvalidUID"


def test_study_notice_content_and_strict_validation():
    image = ct()
    message = notice_handler().handle(image)
    strict(message)
    obr = message.segment("OBR")
    assert obr.get(25) == "I" and obr.get(3) == "ACC0001" and obr.get(7) == "20260101101500"
    rows = [(o.get(2), o.get(3), o.get(5)) for o in message.all("OBX")]
    assert rows == [("ST", "113014", image.StudyInstanceUID), ("CE", "121139", "CT"),
                    ("DT", "111060", "20260101"), ("TM", "111061", "101500")]
    assert message.segment("PID").get(3) == CANARY_ID
    assert message.segment("PID").get(5) + "^" + message.segment("PID").get(5, 2) == CANARY


def test_a_custom_handler_is_a_few_lines():
    from nodes.hl7 import Segment, msh

    class Hello(Handler):
        name, version = "hello", "2"

        def handle(self, ds):
            return Message([msh(samples.RIS, ("ORU", "R01", "ORU_R01"), control_id="1",
                                now=samples.FIXED_NOW),
                            Segment("PID", {3: str(ds.PatientID), 5: ("Doe", "J")})])

    handler = Hello()
    assert handler.label == "hello 2"
    assert handler.handle(ct()).segment("PID").get(3) == CANARY_ID


def test_items_without_a_concept_name_walk_with_none_however_it_is_missing():
    from nodes.hl7.sr import walk

    absent = samples.content("TEXT", None, TextValue="absent")
    empty = samples.content("TEXT", None, TextValue="empty")
    empty.ConceptNameCodeSequence = []
    named = samples.text(samples.code("121071", "DCM", "Finding"), "named")
    ds = samples.report(samples.COMPREHENSIVE_SR, [absent, empty, named])
    assert [(c.path, c.concept) for c in walk(ds)] == [
        ("1", None), ("2", None), ("3", ("121071", "DCM", "Finding"))]
    obx3 = [o.get(3) for o in sr_handler().handle(ds).all("OBX")[:3]]
    assert obx3 == ["TEXT", "TEXT", "121071"]
