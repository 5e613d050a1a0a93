"""Pure library shared by the training and labelling jobs: labels, preprocessing, models,
checkpoints, storage, the Parquet label schema, and a synthetic-face generator.

Nothing in here starts Ray or orchestrates a job; jobs/ does that.
"""

__version__ = "0.1.0"
