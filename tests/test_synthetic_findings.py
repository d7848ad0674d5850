"""ihd.synthetic_findings: the other-pathology finding and synthetic study labels."""
import numpy as np

from ihd.synthetic_findings import Finding, draw_finding, paint_finding, study_label_table


def test_findings_come_from_their_own_stream_at_the_set_fraction():
    drawn = [draw_finding(0, n, 75.0, 93.0) for n in range(400)]
    assert 0.22 < np.mean([d is not None for d in drawn]) < 0.38
    assert {d.kind for d in drawn if d} == {"infarct", "calcified_mass"}
    assert draw_finding(0, 7, 75.0, 93.0) == draw_finding(0, 7, 75.0, 93.0)


def test_painting_touches_only_parenchyma_outside_bleeds_within_the_finding():
    axis = np.arange(-20.0, 20.0)
    x, y = np.meshgrid(axis, axis)
    hu = np.full(x.shape, 30.0, np.float32)
    hu[:, :5] = 8.0  # CSF
    bleeding = np.zeros(x.shape, bool)
    bleeding[20, 20] = True
    infarct = Finding("infarct", 60.0, 10.0, 0.0, 0.0, 10.0, -12.0)
    painted = paint_finding(hu, infarct, 60.0, x, y, bleeding)
    inside = x ** 2 + y ** 2 < 100
    assert np.all(painted[inside & ~bleeding] == 18.0) and painted[20, 20] == 30.0
    assert np.all(painted[~inside] == hu[~inside])
    assert np.array_equal(paint_finding(hu, infarct, 71.0, x, y, bleeding), hu)  # above its top
    mass = paint_finding(hu, Finding("calcified_mass", 60.0, 5.0, 0.0, 0.0, 4.0, 300.0), 60.0, x, y, bleeding)
    assert mass.max() == 300.0


def test_study_labels_put_hemorrhage_first_and_other_only_without_a_bleed():
    table = study_label_table(["A", "B", "C"], [np.array([[0, 1, 0, 0, 0, 1], [0] * 6]), np.zeros((2, 6)),
                                                 np.zeros((3, 6))], [True, True, False])
    assert table.loc["A", ["intraparenchymal", "any", "hemorrhage", "other"]].tolist() == [1, 1, 1, 0]
    assert table.loc["B", ["hemorrhage", "no_finding", "other"]].tolist() == [0, 0, 1]
    assert table.loc["C", ["hemorrhage", "no_finding", "other"]].tolist() == [0, 1, 0]
