"""Run the numbabn command line from a checkout (``python cli.py --help``); not installed."""

if __name__ == "__main__":
    from numbabn.cli import main

    main()
