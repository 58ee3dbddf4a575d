"""RoAd configs for the ONNX conformance suite (and tests/test_method_road.py): road_1 with groups
of 8 on q/v/down_proj (outputs 32, 16, 32), road_4 with groups of 4 on o_proj/up_proj."""

CASES = {
    "road-llama": dict(config="RoadConfig", model="llama", per_row=True,
                       kwargs=dict(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "road4-llama": dict(config="RoadConfig", model="llama", per_row=True,
                        kwargs=dict(variant="road_4", group_size=4, target_modules=["o_proj", "up_proj"])),
}
