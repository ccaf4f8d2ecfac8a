"""The web apps: the prediction page + JSON API (`predict_app`) and the review page (`review_app`)."""
