"""Facts the code relies on: class names, normalisation statistics, MVTec AD names and defaults."""

CLASS_NAMES = ("Good", "Anomaly")
GOOD, ANOMALY = 0, 1  # index 1 of the model's output is the Anomaly score

# ImageNet statistics; the weights enums carry the same numbers, used when weights are random.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
SYNTHETIC_SUBSET = "synthetic"

# MVTec AD archive (CC BY-NC-SA 4.0). The host has moved before: overridable by parameter
# and by the environment variable below.
MVTEC_URL = (
    "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
    "420938113-1629960298/mvtec_anomaly_detection.tar.xz"
)
MVTEC_URL_ENV = "MVTEC_URL"
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_ARCHIVE_NAME = "mvtec_anomaly_detection.tar.xz"
MVTEC_PAGE_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MVTEC_LICENSE = (
    "MVTec AD is released under CC BY-NC-SA 4.0 (non-commercial use, attribution, "
    "share-alike); Copyright 2019 MVTec Software GmbH."
)
# A real MVTec AD folder for the tests that need real images (one folder per category).
MVTEC_DIR_ENV = "MVTEC_AD_DIR"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GOOD_FOLDER = "good"  # matched in any case: good, Good, GOOD
# Folder names people give good parts; refused rather than read as a defect type named "OK".
GOOD_SYNONYMS = ("ok", "normal", "pass", "passed", "nominal", "defect_free", "no_defect", "nodefect")
SUBSET_FOLDERS = ("train", "test", "ground_truth")  # the only folders of a subset that are read
MASK_SUFFIX = "_mask"

SIZE_MULTIPLE = 32  # both backbones downsample by 32 before the head
