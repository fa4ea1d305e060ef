"""The BidirUncertaintySeg module's library: everything a test can reach without the Slicer GUI.

* :mod:`.presenter` - the panel's state machine (Qt-free);
* :mod:`.parameters` - the parameter node: definitions, widget bindings, TrainConfig filling;
* :mod:`.engine` - where the engine (``buseg``) is, its command lines, its worker client,
  its output file names (the one place that knows them);
* :mod:`.dependencies` - which Python packages are missing and how to install them;
* :mod:`.nodefiles` - MRML nodes to worker files and back (geometry kept);
* :mod:`.review` - uncertainty overlay, regions table and markups, jump to a region, loss plot;
* :mod:`.workflow` - train / segment / rank / add a corrected case, on a scene given explicitly.
* :mod:`.panel` - what the panel's buttons do (start, follow, cancel, stop jobs; install; the
  review loop), with the application's dialogs and timer passed in.

Only ``BidirUncertaintySeg.py`` imports ``qt``/``ctk``; these modules use MRML through
``slicer`` (the application's, or PyPI ``slicer-core`` in tests) and never the GUI.
"""
