"""Files: reading and writing medical images and the user's folders.

:mod:`~buseg.files.images` reads and writes image and label files (NIfTI, NRRD, MHA, Slicer
``.seg.nrrd``) with their geometry, :mod:`~buseg.files.image_checks` refuses headers that
would be misread, and :mod:`~buseg.files.safe_files` writes into the user's folders without
ever leaving a half-written file or overwriting what the user made (atomic writes, the folder
lock, a killed writer's leftovers). The lowest stage: it imports no other stage.
"""
