"""The cells ``audit`` searches images in: an image the label-noise search found no plausible centre for is also
filed in its exact nearest centre's cell."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from facepipe.audit.checks import label_noise, robust_centres
from facepipe.audit.neighbours import exact_top_k
from facepipe.audit.run import _image_cells
from tests.audit.test_checks import _synthetic


def test_an_image_whose_centre_search_missed_gets_its_exact_nearest_centre():
    data, moved, *_ = _synthetic()
    centres = robust_centres(data.vectors, data.identity, len(data.names))
    noise = label_noise(data.vectors, data.identity, centres)
    misfiled = data.paths.index(sorted(moved)[0])
    true_centre = exact_top_k(data.vectors[[misfiled]], centres.unit, 1)[1][0, 0]
    assert true_centre != data.identity[misfiled]
    cells = _image_cells(data, centres.unit, noise)
    assert cells[misfiled, 1] == true_centre and (cells[:, 3] == -1).all()  # found: nothing added, for anyone

    # the search missed: it returned two unrelated centres, far below a same-person similarity
    wrong = [c for c in range(len(data.names)) if c not in (true_centre, data.identity[misfiled])][:2]
    indices, sims = noise.neighbours.indices.copy(), noise.neighbours.similarities.copy()
    indices[misfiled], sims[misfiled] = wrong, [0.05, 0.04]
    missed = replace(noise, neighbours=replace(noise.neighbours, indices=indices, similarities=sims))
    cells = _image_cells(data, centres.unit, missed)
    assert cells[misfiled, 3] == true_centre
    assert (cells[np.arange(len(cells)) != misfiled, 3] == -1).all()
