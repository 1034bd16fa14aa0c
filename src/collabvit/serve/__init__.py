"""`collabvit serve`: the Open Inference Protocol service (`service`) and what keeps it
answering whatever its clients do (`guard`). FastAPI, uvicorn and prometheus_client live
here and nowhere else.
"""
