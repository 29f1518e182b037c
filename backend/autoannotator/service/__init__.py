"""The deployed processes: the Flask app (the ML backend protocol), the Flask-free annotator behind
/predict, rq jobs and workers, the status page.
"""
