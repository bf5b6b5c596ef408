"""Ways to get an independent interpreter, behind one small protocol.

``base``            the worker protocol every backend implements
``process``         one worker process per interpreter (stock CPython, runs torch)
``capabilities``    what this Python can run, detected in one place
"""
