"""robots.py: openpi's configs as data. Most of it is judged against openpi's own Policy in
test_openpi_policy.py; here, what a user's dataset needs to be read as a config reads it."""

import pytest

import robots


def test_a_dataset_with_other_camera_names_is_mapped_with_cameras():
    cams = ["observation.images.high", "observation.images.left"]  # openpi's ALOHA repack reads ...images.top
    with pytest.raises(KeyError, match=r"pi0_aloha needs camera 'observation.images.top' \(the robot's images/cam_high\)"):
        robots.dataset_columns("pi0_aloha", cams)
    images, state, actions = robots.dataset_columns("pi0_aloha", cams,
                                                    override=robots.parse_cameras("cam_high=observation.images.high"))
    assert images == {"images/cam_high": "observation.images.high"}  # the cameras its repack reads
    assert state == ["observation.state"] and actions == "action"
    with pytest.raises(KeyError, match=r"--cameras \{'top': 'observation.images.high'\}: pi0_aloha's cameras are"):
        robots.dataset_columns("pi0_aloha", cams, override={"top": "observation.images.high"})
    with pytest.raises(KeyError, match=r"--cameras \{'cam_high': 'nope'\}"):
        robots.dataset_columns("pi0_aloha", cams, override={"cam_high": "nope"})


def test_every_config_has_a_recipe_and_settings():
    import recipes
    assert set(recipes.RECIPES) == set(robots.OPENPI_CONFIGS) and len(robots.OPENPI_CONFIGS) == 25
    for name in robots.OPENPI_CONFIGS:
        s = robots.policy_settings(name)
        assert s["openpi_config"] == name and len(s["cameras"]) == len(s["views"])
