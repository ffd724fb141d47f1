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

One detector may be shared by threads (a web handler, a thread pool): its calls take turns (a lock around the
model-dependent work, whose gradient routes swap the model's parameters or hook its layers while they run), so
each call gets exactly the result of that call made alone. Torch already spreads one call over every core, so
taking turns costs little throughput; load one detector per process for parallel scoring.
"""

from lowgrad.estimator import LowGrad as OODDetector

__all__ = ["OODDetector"]
