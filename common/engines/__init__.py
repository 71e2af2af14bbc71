"""MONAI/ignite workflows that the plain SupervisedTrainer cannot express.

Paired frames, unpaired two-modality batches, alternating two-network registration and point tracking.
"""
