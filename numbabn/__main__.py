"""``python -m numbabn``: the same as the ``numbabn`` command."""

if __name__ == "__main__":
    from numbabn.cli import main

    main()
