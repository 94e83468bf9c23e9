from punchline.cli.main import run

run()
