"""tests/compare_plates.py, the check that a refactor changed no output: two runs of the same
binary on the same seeded plate write the same plate (the daemon is deterministic), and a single
changed pixel or cell value is found."""

import zarr

from compare_plates import compare, write_plate
from liveomics_testkit import sim_toml


def test_same_run_same_plate_and_one_changed_value_is_found(binary, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(sim_toml(plate="cmp", wells=("A1", "B2"), fields=2, size=256, seed=3))
    a = write_plate(str(binary), tmp_path / "a", str(cfg))
    b = write_plate(str(binary), tmp_path / "b", str(cfg))
    assert compare(a, b) == []
    image = zarr.open_array(b / "B" / "2" / "1" / "0", mode="r+")
    image[0, 10, 10] = int(image[0, 10, 10]) + 1
    area = zarr.open_array(b / "A" / "1" / "0" / "tables" / "table" / "obs" / "area_px", mode="r+")
    area[0] = area[0] + 1
    assert sorted(compare(a, b)) == ["A/1/0/tables/table/obs/area_px: values differ", "B/2/1/0: values differ"]
