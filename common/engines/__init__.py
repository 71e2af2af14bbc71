"""MONAI/ignite workflows the plain SupervisedTrainer cannot express (paired frames, unpaired modalities, two-network registration, point tracking)."""
