from train_cli.app import main

main()
