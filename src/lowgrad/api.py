"""Score new images with a fitted detector, in the scikit-learn / pytorch-ood style::

    from lowgrad import OODDetector
    det = OODDetector.load("path/to/project")        # the run's artifacts/detector, checked against its files
    scores = det.score(images)                        # {row: scores}, higher = more in-distribution
    is_ood = det.predict(images, row="grad_residual")  # True below the row's threshold at 95 % ID TPR

``OODDetector`` is :class:`lowgrad.LowGrad`, the estimator: ``load`` returns the fitted estimator of a finished
run (or of a folder ``LowGrad.save`` wrote). ``images``: uint8 ``N x H x W x C`` arrays of the run's
``data.image_size`` and ``data.channels`` (the run's normalisation is applied here), or a torch ``DataLoader``
yielding such batches (or ``(images, labels)`` pairs). New inputs go through the run's own code path
(:class:`lowgrad.fitted.FittedDetector`): the ``extract`` stage's forward pass and gradient route (the saved model, sketch factors
and seed), the ``project`` stage's ``G_low = phi(g) V`` with the saved normaliser and basis, then each saved row as
``score`` fitted it. Nothing is refitted.

One detector may be shared by threads: :mod:`lowgrad.fitted` says how.
"""

from lowgrad.estimator import LowGrad as OODDetector

__all__ = ["OODDetector"]
