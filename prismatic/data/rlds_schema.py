"""The LIBERO RLDS schema (`modified_libero_rlds`): flattened Example keys and the TFDS metadata files.

`features.json` and `dataset_info.json` are produced in the format tensorflow-datasets 4.9 writes itself, so
`tfds.builder_from_directory` reads folders made by `rlds_writer` exactly like the published ones.
"""

from __future__ import annotations

from typing import Any

STEP_PREFIX = "steps/"
IMAGE_KEY = "steps/observation/image"
WRIST_IMAGE_KEY = "steps/observation/wrist_image"
STATE_KEY = "steps/observation/state"
JOINT_STATE_KEY = "steps/observation/joint_state"
ACTION_KEY = "steps/action"
LANGUAGE_KEY = "steps/language_instruction"
REWARD_KEY = "steps/reward"
DISCOUNT_KEY = "steps/discount"
IS_FIRST_KEY = "steps/is_first"
IS_LAST_KEY = "steps/is_last"
IS_TERMINAL_KEY = "steps/is_terminal"
FILE_PATH_KEY = "episode_metadata/file_path"

STATE_DIM = 8
JOINT_STATE_DIM = 7
ACTION_DIM = 7
IMAGE_SHAPE = (256, 256, 3)
CAMERA_KEYS = {"image": IMAGE_KEY, "wrist_image": WRIST_IMAGE_KEY}
VECTOR_KEYS = {STATE_KEY: STATE_DIM, JOINT_STATE_KEY: JOINT_STATE_DIM, ACTION_KEY: ACTION_DIM}
SCALAR_FLOAT_KEYS = (REWARD_KEY, DISCOUNT_KEY)
SCALAR_BOOL_KEYS = (IS_FIRST_KEY, IS_LAST_KEY, IS_TERMINAL_KEY)
REQUIRED_KEYS = (IMAGE_KEY, STATE_KEY, ACTION_KEY, LANGUAGE_KEY)  # what the pipeline reads; wrist only if asked

VERSION = "1.0.0"
SPLIT = "train"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"

_FEATURES = "tensorflow_datasets.core.features."


def shard_file_name(tfds_name: str, index: int, num_shards: int, split: str = SPLIT) -> str:
    """`<tfds_name>-train.tfrecord-00000-of-00004`."""
    return f"{tfds_name}-{split}.tfrecord-{index:05d}-of-{num_shards:05d}"


def _tensor(shape: tuple[int, ...], dtype: str, doc: str, scalar: bool = False) -> dict[str, Any]:
    shape_json: dict[str, Any] = {"dimensions": [str(d) for d in shape]} if shape else {}
    return {"description": doc,
            "pythonClassName": _FEATURES + ("scalar.Scalar" if scalar else "tensor_feature.Tensor"),
            "tensor": {"dtype": dtype, "encoding": "none", "shape": shape_json}}


def _image(shape: tuple[int, int, int], doc: str) -> dict[str, Any]:
    return {"description": doc,
            "image": {"dtype": "uint8", "encodingFormat": "jpeg", "shape": {"dimensions": [str(d) for d in shape]}},
            "pythonClassName": _FEATURES + "image_feature.Image"}


def _text(doc: str) -> dict[str, Any]:
    return {"description": doc, "pythonClassName": _FEATURES + "text_feature.Text", "text": {}}


def _dict(features: dict[str, Any]) -> dict[str, Any]:
    return {"featuresDict": {"features": features}, "pythonClassName": _FEATURES + "features_dict.FeaturesDict"}


def features_json(image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> dict[str, Any]:
    """The `features.json` of a LIBERO RLDS dataset."""
    observation = _dict({
        "image": _image(image_shape, "Main camera RGB observation."),
        "wrist_image": _image(image_shape, "Wrist camera RGB observation."),
        "state": _tensor((STATE_DIM,), "float32", "Robot EEF state (6D pose, 2D gripper)."),
        "joint_state": _tensor((JOINT_STATE_DIM,), "float32", "Robot joint angles."),
    })
    step = _dict({
        "action": _tensor((ACTION_DIM,), "float32", "Robot EEF action."),
        "discount": _tensor((), "float32", "Discount if provided, default to 1.", scalar=True),
        "is_first": _tensor((), "bool", "True on first step of the episode.", scalar=True),
        "is_last": _tensor((), "bool", "True on last step of the episode.", scalar=True),
        "is_terminal": _tensor((), "bool", "True on last step of the episode if it is a terminal step.", scalar=True),
        "language_instruction": _text("Language Instruction."),
        "observation": observation,
        "reward": _tensor((), "float32", "Reward if provided, 1 on final step for demos.", scalar=True),
    })
    return _dict({
        "episode_metadata": _dict({"file_path": _text("Path to the original data file.")}),
        "steps": {"pythonClassName": _FEATURES + "dataset_feature.Dataset",
                  "sequence": {"feature": step, "length": "-1"}},
    })


def dataset_info_json(tfds_name: str, shard_lengths: list[int], num_bytes: int,
                      description: str = "") -> dict[str, Any]:
    """The `dataset_info.json` of a single-split (train) TFRecord dataset."""
    return {
        "description": description,
        "fileFormat": "tfrecord",
        "moduleName": "prismatic.data.rlds_writer",
        "name": tfds_name,
        "splits": [{"filepathTemplate": FILE_TEMPLATE, "name": SPLIT, "numBytes": str(num_bytes),
                    "shardLengths": [str(n) for n in shard_lengths]}],
        "version": VERSION,
    }
