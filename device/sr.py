"""A study's result as DICOM: a Comprehensive 3D SR with TID 1500 at its root, as IHE AI Results asks.

The SR is what a PACS shows beside the images: the finding, the model that made it, and the images it read.
:func:`build_sr` makes one per study result, from the study's source image data sets; the caller sends it
(device/pacs.py). The patient and study identity are copied from the first source image (the one place where
the appliance repeats them), in a new series with a new SOP Instance UID per SR.

Content tree (TID 1500 "Imaging Measurement Report")::

    Observation context: device observer, UID = the model's device UID, manufacturer pneumoflag, model name
    Procedure reported:  (399208008, SCT, "Plain chest X-ray")
    Image library:       every source image
    Imaging measurements / measurement group (TID 1501)
        Tracking identifier, finding type (233604007, SCT, "Pneumonia"), algorithm name and version (TID 4019),
        every source image (SOP class and instance UIDs)
        Pneumonia = (415684004, SCT, "Suspected") | (NOT-SUSPECTED, 99PNEUMOFLAG, "Not suspected")
        Priority (260870009, SCT) = (URGENT|FLAG|ROUTINE, 99PNEUMOFLAG, ...)
        Probability (122157, DCM) in (1, UCUM, "no units"), 0-1
        Threshold Value (122411, DCM) in (1, UCUM): the operating point that decided the tier
        Comment (121106, DCM): "triage aid, not a diagnostic device" and what the numbers mean

Why these codes: SNOMED CT and DCM codes where the standard has one (the finding, the procedure, "Suspected",
probability, threshold, priority as an attribute), so any viewer can label them. A triage aid never rules
pneumonia *out*, so "not suspected" is not SNOMED's "Absent"; it and the three tiers (the appliance's own
operating points) are codes of a private scheme, ``99PNEUMOFLAG`` (PS3.16 8.2: "99" designators are private),
declared in the Coding Scheme Identification Sequence.

The model appears twice, as IHE AIR asks: in the Contributing Equipment Sequence (Manufacturer "pneumoflag",
the model's name, its version as Software Versions, and a Device UID derived from its sha256 by
:func:`device_uid`, so a retrained model is a new device) and as the device observer of the observations.
highdicom is imported here at module level: import this module only where the ``dicom`` extra is installed.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import highdicom as hd
import highdicom.coding_schemes
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .card import Thresholds
from .dicom import is_uid
from .vocab import Priority

MANUFACTURER = "pneumoflag"
DISCLAIMER = "triage aid, not a diagnostic device"
#: the private coding scheme of the codes the standard has none for
SCHEME = "99PNEUMOFLAG"
#: UUIDv5 namespace of the model device UIDs (a fixed random UUID: the same sha256 gives the same UID everywhere)
DEVICE_NAMESPACE = uuid.UUID("6b1f3c2e-2d7a-4c57-9a51-7f0e6a2c9d14")

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
SUSPECTED = Code("415684004", "SCT", "Suspected")
NOT_SUSPECTED = Code("NOT-SUSPECTED", SCHEME, "Not suspected")
PRIORITY = Code("260870009", "SCT", "Priority")
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD = Code("122411", "DCM", "Threshold Value")
COMMENT = Code("121106", "DCM", "Comment")
NO_UNITS = Code("1", "UCUM", "no units")
TIER_CODES = {p: Code(p.value.upper(), SCHEME, p.value.capitalize()) for p in Priority}
#: the two series this appliance makes in a study: the SRs, and the heat maps
SR_SERIES_NUMBER, HEATMAP_SERIES_NUMBER = 9901, 9902

_SHA256 = re.compile(r"[0-9a-f]{64}")


def device_uid(sha256: str) -> str:
    """The model's DICOM Device UID: ``2.25.`` and a UUIDv5 of its sha256 (a retrained model is a new device)."""
    sha = sha256.strip().lower()
    if not _SHA256.fullmatch(sha):
        raise ValueError(f"model sha256 {sha256[:80]!r} is not 64 hex digits")
    return f"2.25.{uuid.uuid5(DEVICE_NAMESPACE, sha).int}"


@dataclass(frozen=True)
class ModelIdentity:
    """The model that scored the study, as the SR names it."""

    name: str
    version: str
    sha256: str

    @property
    def device_uid(self) -> str:
        return device_uid(self.sha256)


@dataclass(frozen=True)
class StudyFinding:
    """One study's result: its probability, its priority tier, and the operating point that decided the tier.

    ``threshold`` is the urgent point for an urgent study, the flag point for a flag study and for a routine
    one (its probability lies below it). Pneumonia is *suspected* for urgent and flag, never for routine.
    """

    probability: float
    priority: Priority
    threshold: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", Priority(self.priority))
        for name in ("probability", "threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], not {v!r}")
        below = self.probability < self.threshold
        if below != (self.priority is Priority.ROUTINE):
            raise ValueError(f"priority {self.priority.value} does not follow from p={self.probability} and "
                             f"threshold {self.threshold}")

    @property
    def suspected(self) -> bool:
        return self.priority is not Priority.ROUTINE

    @classmethod
    def from_thresholds(cls, probability: float, thresholds: Thresholds) -> "StudyFinding":
        """The finding the card's operating points give ``probability``."""
        priority = Priority(thresholds.priority(probability))
        threshold = thresholds.urgent if priority is Priority.URGENT else thresholds.flag
        return cls(float(probability), priority, float(threshold))


def _header(ds: Dataset) -> Dataset:
    """The source image's attributes the SR copies or references, with the empty type-2 ones highdicom reads."""
    out = Dataset()
    for element in ds:
        if element.keyword and element.keyword != "PixelData":
            out.add(element)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def _check_images(images: Sequence[Dataset]) -> list[Dataset]:
    if not images:
        raise ValueError("an SR needs at least one source image")
    headers = [_header(ds) for ds in images]
    studies = {str(h.get("StudyInstanceUID", "")) for h in headers}
    if len(studies) != 1 or not is_uid(next(iter(studies))):
        raise ValueError(f"the source images must share one valid StudyInstanceUID, not {sorted(studies)}")
    for h in headers:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
            if not is_uid(str(h.get(keyword, ""))):
                raise ValueError(f"a source image has no valid {keyword}")
    return headers


def _group(headers: Sequence[Dataset], finding: StudyFinding, model: ModelIdentity) -> Any:
    """The TID 1501 measurement group: the finding, its probability, tier and threshold, the images, the model."""
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                              parameters=[f"sha256={model.sha256}"])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="pneumonia triage"),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(h) for h in headers],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(PNEUMONIA, SUSPECTED if finding.suspected else NOT_SUSPECTED),
            hd.sr.QualitativeEvaluation(PRIORITY, TIER_CODES[finding.priority]),
        ],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=round(finding.probability, 6), unit=NO_UNITS),
            hd.sr.Measurement(name=THRESHOLD, value=round(finding.threshold, 6), unit=NO_UNITS),
        ],
    )
    tier = finding.priority.value
    relation = "below" if finding.priority is Priority.ROUTINE else "at or above"
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        value=f"pneumoflag: {DISCLAIMER}. Pneumonia probability {finding.probability:.4f}, {relation} the "
              f"{tier} threshold {finding.threshold:.4f}: priority {tier}. Every image is still read by a "
              "clinician."))
    return group


def _library(headers: Sequence[Dataset]) -> Any:
    """The TID 1600 Image Library: each source image, without descriptors (TID 1602 is optional, and highdicom's
    projection descriptors need PatientOrientation and ImagerPixelSpacing, which a CR need not carry)."""
    rel = hd.sr.RelationshipTypeValues.CONTAINS
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=rel)
    group.ContentSequence = hd.sr.ContentSequence([
        hd.sr.ImageContentItem(name=codes.SCT.Source, referenced_sop_class_uid=h.SOPClassUID,
                               referenced_sop_instance_uid=h.SOPInstanceUID, relationship_type=rel)
        for h in headers])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=rel)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _equipment(model: ModelIdentity) -> Any:
    """The model as Contributing Equipment (IHE AIR): name, version, and the Device UID of its sha256."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name, software_versions=model.version,
        contribution_description=f"pneumonia triage model, sha256 {model.sha256[:16]}; {DISCLAIMER}")
    item.DeviceUID = model.device_uid
    return item


def build_sr(images: Sequence[Dataset], finding: StudyFinding, model: ModelIdentity, *,
             series_instance_uid: Optional[str] = None, instance_number: int = 1,
             sop_instance_uid: Optional[str] = None) -> Dataset:
    """The study's result as a Comprehensive 3D SR (TID 1500) referencing every source image; a new SOP UID each
    call unless ``sop_instance_uid`` is given (the PACS outbox derives it from the result's event id, so a resend
    after a crash is the same instance).

    ``images`` are the study's source data sets (pixel data not needed); ``series_instance_uid`` lets a
    later SR of the same study join the first one's series. A ``ValueError`` says what is missing.
    """
    headers = _check_images(images)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=model.name, manufacturer_name=MANUFACTURER, model_name=model.name))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[_group(headers, finding, model)],
        title=codes.DCM.ImagingMeasurementReport,
    )
    root = report[0]
    at = next(i for i, item in enumerate(root.ContentSequence) if item.ConceptNameCodeSequence[0].CodeValue == "126010")
    root.ContentSequence.insert(at, _library(headers))  # before "Imaging Measurements", as TID 1500 orders them
    return hd.sr.Comprehensive3DSR(
        evidence=headers, content=root, series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number, manufacturer=MANUFACTURER, manufacturer_model_name=model.name,
        software_versions=model.version, series_description=f"pneumoflag: {DISCLAIMER}",
        is_complete=True, is_final=False,  # preliminary: a triage aid's result is never the definitive report
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(
            designator=SCHEME, name="pneumoflag triage codes", responsible_organization=MANUFACTURER)],
        contributing_equipment=[_equipment(model)],
    )


def build_heatmap_sc(image: Dataset, overlay_rgb: np.ndarray, model: ModelIdentity, *,
                     series_instance_uid: Optional[str] = None, instance_number: int = 1,
                     sop_instance_uid: Optional[str] = None) -> Dataset:
    """The heat map overlay (an RGB uint8 array) as a Secondary Capture in its own series of the image's study."""
    header = _check_images([image])[0]
    rgb = np.ascontiguousarray(overlay_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"the overlay must be an RGB uint8 array, not {rgb.dtype} {rgb.shape}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_instance_uid or hd.UID(),
        series_number=HEATMAP_SERIES_NUMBER, sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER, series_description=f"pneumoflag heat map: {DISCLAIMER}",
        patient_orientation=("L", "F"))
    sc.Laterality = ""  # type 2C: a chest is not a paired body part; dciodvfy asks for the element
    sc.BurnedInAnnotation = "YES"  # the probability and the notice are drawn into the overlay
    sc.ContributingEquipmentSequence = [_equipment(model)]
    sc.DerivationDescription = f"where the model looked (occlusion sensitivity); {DISCLAIMER}"
    return sc

