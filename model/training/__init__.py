"""Training and evaluation: data, training, the digit classifier's evaluation, TeaCache calibration,
the bench and its quality floors. No serving module imports this package."""
