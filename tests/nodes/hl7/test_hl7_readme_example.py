"""The custom Handler shown in README.md and docs/hl7.md, and its test, verbatim: if this
file changes, change both documents (and the other way round)."""

# --- README example: the handler -----------------------------------------------------------
from nodes.hl7 import Handler, Message, Segment, msh, xpn

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"


class KeyImagesToRis(Handler):
    """A radiologist flagged key images → ORU^R01 telling the RIS which study has them."""

    name, version = "key-images", "1.0"  # recorded with every message it makes

    def __init__(self, ris):
        self.ris = ris  # the [ris] table: MSH-3..6

    def handle(self, ds):
        if ds.SOPClassUID != KEY_OBJECT_SELECTION:
            return None  # not ours: the object is settled as Skipped
        return Message([
            msh(self.ris, ("ORU", "R01", "ORU_R01")),
            Segment("PID", {1: "1", 3: ds.PatientID, 5: xpn(ds.PatientName)}),
            Segment("OBR", {1: "1", 3: ds.AccessionNumber, 4: ("KEY", "Key images", "99SITE")}),
            Segment("OBX", {1: "1", 2: "ST", 3: ("113014", "DICOM Study", "DCM"),
                            5: ds.StudyInstanceUID, 11: "F"}),
        ])
# --- end of the handler ---------------------------------------------------------------------


# --- README example: its test -------------------------------------------------------------
from pydicom import Dataset  # noqa: E402

from nodes.hl7 import RisConfig  # noqa: E402


def test_key_images_become_an_oru_for_their_study():
    ds = Dataset()
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.PatientID, ds.PatientName = "P42", "Doe^Jane^^Dr."
    ds.AccessionNumber, ds.StudyInstanceUID = "A|7", "1.2.3.4"
    er7 = KeyImagesToRis(RisConfig(host="ris.example")).handle(ds).to_er7()
    assert "\rPID|1||P42||Doe^Jane^^^Dr.\r" in er7  # DICOM's prefix moves to XPN-5
    assert "\rOBR|1||A\\F\\7|KEY^Key images^99SITE\r" in er7  # "|" escaped as \F\
    assert "\rOBX|1|ST|113014^DICOM Study^DCM||1.2.3.4||||||F\r" in er7
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # a CT image
    assert KeyImagesToRis(RisConfig(host="ris.example")).handle(ds) is None
# --- end of the test --------------------------------------------------------------------------


def test_the_example_is_valid_hl7_2_5_1():
    """Beyond the README: hl7apy (strict, 2.5.1) accepts what the example builds."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    ds = Dataset()
    ds.SOPClassUID = KEY_OBJECT_SELECTION
    ds.PatientID, ds.PatientName = "P42", "Doe^Jane^^Dr."
    ds.AccessionNumber, ds.StudyInstanceUID = "A|7", "1.2.3.4"
    message = KeyImagesToRis(RisConfig(host="ris.example")).handle(ds)
    parsed = parse_message(message.to_er7(), validation_level=VALIDATION_LEVEL.STRICT,
                           find_groups=True)
    assert parsed.validate() is True
