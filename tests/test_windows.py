"""ihd.windows: hand-computed windows and recipe parsing."""
import numpy as np
import pytest

from ihd.windows import RECIPES, WINDOWS, parse_recipe, window


def test_brain_window_maps_0_to_80_hu_onto_0_to_1():
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 80.0, 1000.0])
    np.testing.assert_allclose(window(hu, 40, 80), [0, 0, 0.25, 0.5, 1, 1])
    assert window(hu, 40, 80).dtype == np.float32


def test_paper_windows_are_the_default_recipe():
    recipe = RECIPES["windows"]
    assert [(w.center_hu, w.width_hu) for w in recipe.windows] == [(40, 80), (80, 200), (40, 380)]
    assert recipe.offsets == (0, 0, 0) and not recipe.uses_neighbours
    assert RECIPES["adjacent"].offsets == (-1, 0, 1) and RECIPES["adjacent"].windows == (WINDOWS["brain"],) * 3


def test_spec_round_trips_and_bad_specs_say_what_is_expected():
    assert parse_recipe(RECIPES["adjacent"].spec).offsets == (-1, 0, 1)
    custom = parse_recipe("0:40/80,0:80/200,2:600/2800")
    assert custom.offsets == (0, 0, 2) and custom.windows[2].width_hu == 2800
    for bad in ("brain", "0:40/80", "0:40/0,0:1/1,0:1/1", "a:b/c,0:1/1,0:1/1", "0:nan/80,0:1/1,0:1/1",
                "0:40/inf,0:1/1,0:1/1", "0:40/nan,0:1/1,0:1/1"):
        with pytest.raises(ValueError, match="recipe"):
            parse_recipe(bad)


def test_paper_000_recipe_is_brain_blood_and_bone():
    recipe = parse_recipe("brain_blood_bone")
    assert [(w.center_hu, w.width_hu) for w in recipe.windows] == [(40, 80), (80, 200), (600, 2800)]
    assert not recipe.uses_neighbours


def test_sources_are_the_distinct_slices_in_first_use_order_and_each_channel_names_its_own():
    windows, adjacent = RECIPES["windows"], RECIPES["adjacent"]
    assert (windows.sources, windows.channel_sources, windows.sources_are_channels) == ((0,), (0, 0, 0), False)
    assert (adjacent.sources, adjacent.channel_sources, adjacent.sources_are_channels) == ((-1, 0, 1), (0, 1, 2), True)
    unordered = parse_recipe("1:40/80,-1:80/200,0:40/380")
    assert unordered.sources == (1, -1, 0) and unordered.sources_are_channels
    shared = parse_recipe("2:40/80,0:80/200,2:40/380")
    assert shared.sources == (2, 0) and shared.channel_sources == (0, 1, 0) and not shared.sources_are_channels
