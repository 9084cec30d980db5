"""Draw `docs/explain_<method>.png`: one picture per explanation method on a real ZTF alert.

The alert is a clean positive PSF residual on a variable star (eye-labelled real in
``training/labels/eye_labels.csv``); the pictures are what ``rbstream explain`` writes,
one method each. Run from the repository root, with the shared real alerts beside it::

    python docs/make_explain_pictures.py [../shared/real] [candid]
"""

from __future__ import annotations

import sys
from pathlib import Path

from service.decode.alerts import decode_message
from service.contract import assemble
from service.explain.attributions import METHODS, explain_stamps
from service.explain.render import render_png
from service.score.model import Scorer

DEFAULT_ALERT = "1703222170415010089"


def main(real: str = "../shared/real", candid: str = DEFAULT_ALERT) -> None:
    root = Path(__file__).resolve().parent.parent
    scorer = Scorer(root / "models" / "ztf", device="cpu")
    (alert,) = decode_message((Path(real) / "ztf" / f"{candid}.avro").read_bytes())
    stamp = assemble(alert.images, scorer.contract, alert.centre)
    (explained,) = explain_stamps(scorer, stamp[None], METHODS)
    meta = {"survey": alert.survey, "id": alert.candidate_id, "object_id": alert.object_id,
            "score": explained["occlusion"].score, "survey_score": alert.survey_score,
            "survey_score_name": alert.survey_score_name}
    for method, explanation in explained.items():
        path = root / "docs" / f"explain_{method.replace('-', '_')}.png"
        path.write_bytes(render_png(stamp, {method: explanation}, meta))
        print(path, explanation.completeness_error)


if __name__ == "__main__":
    main(*sys.argv[1:])
