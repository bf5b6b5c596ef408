"""Ways to get an independent interpreter, behind one small protocol.

``base``            the worker protocol every backend implements; restart policy
``capabilities``    what this Python can run, detected in one place
``process``         one worker process per interpreter (stock CPython, runs torch);
                    ``_process_main`` is its worker loop
``thread``          an isolated module namespace per interpreter, driven by a thread
                    (parallel only on free-threaded CPython); ``_by_reference`` moves
                    its values
``subinterpreter``  a CPython 3.13+ own-GIL subinterpreter per interpreter (no torch);
                    ``_subinterp_main`` runs inside (its wire: ``transport.subinterp_wire``)
"""
