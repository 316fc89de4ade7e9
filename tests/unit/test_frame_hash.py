"""The content hash of a frame covers every value, vector columns too."""

import numpy as np
import pandas as pd


def test_frame_hash_covers_vector_columns():
    """text_embeddings frames hold one vector per cell; their hash must see every number."""
    from resources.storage import frame_hash

    a = pd.DataFrame({"row_id": ["1", "2"], "t__embedding": [np.ones(3, np.float32), np.zeros(3, np.float32)]})
    b = a.copy()
    b.at[1, "t__embedding"] = np.array([0, 0, 1e-6], np.float32)
    assert frame_hash(a) == frame_hash(a.copy()) != frame_hash(b)
