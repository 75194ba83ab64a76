"""Build the synthetic model validation report (MVR) shipped in ``tidyllm/apps/samples/`` as PDF and DOCX.

The report is made up (a fictitious bank's retail mortgage PD model); it exists so the applications
(``tidyllm.apps``), their notebook and their tests have a realistic ~20-page document to read. Both files
come from the one outline below, so the PDF and the DOCX say the same thing: headings become PDF bookmarks
(the structure ``tidyllm.apps.read_document`` reads back) and DOCX ``Heading 1/2`` styles.

Run from the repository root after changing the outline (needs ``fpdf2`` and ``python-docx``, both in the
``apps`` extra)::

    python scripts/make_sample_documents.py

The text is deterministic (``random.Random(SEED)``), and so are the files: the PDF's creation date is
fixed and the DOCX's core properties are set, so re-running it changes nothing unless the outline did.
"""

from __future__ import annotations

import datetime as dt
import random
import sys
import zipfile
from pathlib import Path

SEED = 20
OUT = Path(__file__).resolve().parents[1] / "tidyllm" / "apps" / "samples"
TITLE = "Model Validation Report: Retail Mortgage Probability of Default Model (RM-PD v3.2)"
FIXED_DATE = dt.datetime(2026, 3, 31, 12, 0, tzinfo=dt.timezone.utc)

# Each section: (heading, [(subheading, [key sentences]), ...]). Key sentences are stated verbatim in the
# report; the filler below is drawn around them so every subsection reads like a validator's prose.
OUTLINE: list[tuple[str, list[tuple[str, list[str]]]]] = [
    ("1 Executive Summary", [
        ("1.1 Scope of the validation", [
            "This report documents the independent validation of the RM-PD v3.2 model used to estimate twelve-month probabilities of default for retail mortgages.",
            "The validation covered conceptual soundness, data quality, performance testing, limitations, ongoing monitoring and governance.",
        ]),
        ("1.2 Overall conclusion", [
            "The model is fit for purpose subject to the remediation of two medium findings and one high finding described in this report.",
            "The validation team rates the overall model risk as moderate.",
        ]),
    ]),
    ("2 Model Purpose and Use", [
        ("2.1 Business use", [
            "The model feeds the expected credit loss calculation, mortgage pricing and the internal capital assessment.",
            "Outputs are consumed monthly by the credit risk and finance functions.",
        ]),
        ("2.2 Model inventory and tiering", [
            "The model is recorded in the model inventory as a tier 1 model because of its direct impact on regulatory capital.",
        ]),
    ]),
    ("3 Conceptual Soundness", [
        ("3.1 Methodology", [
            "The model is a logistic regression on loan-to-value, debt-to-income, payment history and regional house price growth.",
            "The developers justified the choice of a logistic link by comparing it with a probit link and a gradient boosting benchmark.",
        ]),
        ("3.2 Variable selection", [
            "Variable selection combined expert judgement with stepwise selection on information value.",
            "The regional house price variable enters with a two-quarter lag that the documentation does not justify.",
        ]),
        ("3.3 Theoretical assumptions", [
            "The model assumes that the relationship between loan-to-value and default is stable across the economic cycle.",
        ]),
    ]),
    ("4 Data Quality", [
        ("4.1 Data sources", [
            "Development data came from the mortgage servicing system for originations between January 2012 and December 2022.",
            "Default flags were derived from ninety days past due events recorded in the collections system.",
        ]),
        ("4.2 Data checks", [
            "The validation team reconciled record counts between the servicing system and the development sample without exceptions.",
            "Debt-to-income was missing for 6.8 percent of loans originated before 2015 and was imputed with the portfolio median.",
        ]),
        ("4.3 Representativeness", [
            "The development sample under-represents interest-only mortgages, which are 9 percent of the current book but 3 percent of the sample.",
        ]),
    ]),
    ("5 Model Performance and Testing", [
        ("5.1 Discriminatory power", [
            "The Gini coefficient on the out-of-time sample is 0.61 against 0.64 in development.",
            "The accuracy ratio remains above the internal threshold of 0.50 in every region.",
        ]),
        ("5.2 Calibration", [
            "Predicted default rates exceed observed default rates by 18 percent in the highest risk grade.",
            "The binomial test rejects calibration for risk grade 9 at the 95 percent confidence level.",
        ]),
        ("5.3 Benchmarking and sensitivity", [
            "A challenger gradient boosting model improved the Gini coefficient by 0.02, which the developers judged immaterial.",
            "Sensitivity analysis shows that a ten percent fall in house prices raises the portfolio average PD from 1.9 percent to 2.6 percent.",
        ]),
        ("5.4 Stress testing", [
            "Under the severe adverse scenario the model produces default rates consistent with the 2009 experience of the portfolio.",
        ]),
    ]),
    ("6 Limitations and Compensating Controls", [
        ("6.1 Known limitations", [
            "The model does not capture payment shock for borrowers moving from fixed to variable rates.",
            "Limited default history for interest-only loans reduces confidence in their estimates.",
        ]),
        ("6.2 Compensating controls", [
            "A management overlay of 25 basis points is applied to interest-only loans until the model is redeveloped.",
            "The overlay is reviewed quarterly by the model risk committee.",
        ]),
    ]),
    ("7 Ongoing Monitoring", [
        ("7.1 Monitoring plan", [
            "The monitoring plan tracks the population stability index, the Gini coefficient and calibration by risk grade every quarter.",
            "A population stability index above 0.25 triggers a review by the model owner within thirty days.",
        ]),
        ("7.2 Monitoring results", [
            "The population stability index for the last four quarters ranged from 0.04 to 0.11.",
        ]),
    ]),
    ("8 Governance and Documentation", [
        ("8.1 Ownership and approvals", [
            "The model owner is the head of retail credit risk and the model was approved by the model risk committee in March 2026.",
        ]),
        ("8.2 Documentation", [
            "The development documentation does not describe the procedure for recalibrating the intercept.",
            "Change logs for the production code were complete and matched the approved version.",
        ]),
    ]),
    ("9 Findings and Recommendations", [
        ("9.1 Findings", [
            "Finding F-1 (high): calibration fails for the highest risk grade and must be remediated before the next capital cycle.",
            "Finding F-2 (medium): the lag on the house price variable must be justified or re-estimated.",
            "Finding F-3 (medium): the recalibration procedure must be documented.",
        ]),
        ("9.2 Remediation plan", [
            "The model owner committed to remediate all findings by 30 September 2026.",
        ]),
    ]),
]

FILLER = [
    "The validation team reviewed the development documentation, the code and the data used to estimate the model.",
    "Evidence for this assessment was obtained through independent replication and discussion with the developers.",
    "The results were compared with the expectations set out in the model risk management policy.",
    "Where the documentation was incomplete, the validation team requested additional analysis from the model owner.",
    "The analysis was repeated on the most recent twelve months of data to confirm that conclusions still hold.",
    "The observations in this subsection were discussed with the model owner before the report was finalised.",
    "The team considered both the materiality of the portfolio and the complexity of the approach.",
    "No material issues beyond those described here were identified during the review of this area.",
    "The scope of testing in this area was proportionate to the tier of the model.",
    "Supporting tables and charts are held in the validation working papers.",
    "The independent replication produced results within the tolerance agreed with the model owner.",
    "Quantitative tests were complemented by a qualitative review of the assumptions made by the developers.",
]


def paragraphs(keys: list[str], rng: random.Random) -> list[str]:
    """The subsection's paragraphs: each key sentence inside filler, then two filler-only paragraphs."""
    out = []
    for key in keys:
        before = rng.sample(FILLER, 2)
        after = rng.sample([f for f in FILLER if f not in before], 3)
        out.append(" ".join([*before, key, *after]))
    for _ in range(2):
        out.append(" ".join(rng.sample(FILLER, 5)))
    return out


def document() -> list[tuple[str, str]]:
    """The report as ("h0"/"h1"/"h2"/"p", text) items."""
    rng = random.Random(SEED)
    items: list[tuple[str, str]] = [("h0", TITLE),
                                    ("p", "Prepared by the Model Validation Group of Example Bank for the Model "
                                          "Risk Committee. Synthetic document generated for tidyllm's samples.")]
    for heading, subsections in OUTLINE:
        items.append(("h1", heading))
        for sub, keys in subsections:
            items.append(("h2", sub))
            items.extend(("p", p) for p in paragraphs(keys, rng))
    return items


def write_pdf(items: list[tuple[str, str]], path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_title(TITLE)
    pdf.set_author("Example Bank Model Validation Group (synthetic)")
    pdf.set_margins(25, 25, 25)
    pdf.set_auto_page_break(True, margin=25)
    pdf.add_page()
    for kind, text in items:
        if kind == "h0":
            pdf.set_font("Helvetica", "B", 16)
            pdf.multi_cell(0, 8, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(4)
        elif kind == "h1":
            pdf.add_page()
            pdf.start_section(text, level=0)
            pdf.set_font("Helvetica", "B", 14)
            pdf.multi_cell(0, 8, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
        elif kind == "h2":
            pdf.start_section(text, level=1)
            pdf.set_font("Helvetica", "B", 12)
            pdf.multi_cell(0, 7, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        else:
            pdf.set_font("Helvetica", "", 11)
            pdf.multi_cell(0, 6.2, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    pdf.output(str(path))


def write_docx(items: list[tuple[str, str]], path: Path) -> None:
    import docx

    doc = docx.Document()
    props = doc.core_properties
    props.title, props.author = TITLE, "Example Bank Model Validation Group (synthetic)"
    props.created = props.modified = FIXED_DATE.replace(tzinfo=None)
    props.last_modified_by, props.revision = "tidyllm", 1
    for kind, text in items:
        if kind == "p":
            doc.add_paragraph(text)
        else:
            doc.add_heading(text, level=int(kind[1]))
    doc.save(str(path))
    _fix_zip_times(path)


def _fix_zip_times(path: Path) -> None:
    """Rewrite the DOCX zip with fixed member times, so the file is byte-identical across runs."""
    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in members:
            fixed = zipfile.ZipInfo(info.filename, date_time=(2026, 3, 31, 12, 0, 0))
            fixed.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(fixed, data)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    items = document()
    write_pdf(items, OUT / "mvr_rm_pd_v3.pdf")
    write_docx(items, OUT / "mvr_rm_pd_v3.docx")
    for name in ("mvr_rm_pd_v3.pdf", "mvr_rm_pd_v3.docx"):
        print(f"{OUT / name}: {(OUT / name).stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
