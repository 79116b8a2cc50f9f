"""Using a finished run: its folder (`folder`), its network (`load`, `export`), scoring it on a
split (`evaluate`, `outputs`), predicting new images (`predict`), and the label review
(`review`, `review_page`, `relabel`)."""
