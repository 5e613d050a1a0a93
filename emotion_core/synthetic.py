"""Deterministic synthetic faces in the Kaggle layout.

Contract:
    render_face(label: str, rng: np.random.Generator, size: int = 48) -> PIL.Image.Image (mode "L")
    generate_dataset(root, train_per_class=60, test_per_class=20, classes=CANONICAL, seed=0,
                     splits=("train", "test")) -> dict[str, int]   # counts per split
"""
