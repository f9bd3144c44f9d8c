"""What a run gives its users: datasets for their trainers, score files, and the HTML report."""
