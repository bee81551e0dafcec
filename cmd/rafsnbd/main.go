// Command rafsnbd turns Nydus RAFS v6 images into block devices: it builds
// and inspects bootstraps, composes and exports flat EROFS disks with
// dm-verity trees, and serves them over NBD to the kernel or to network
// clients.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// commands is filled by each cmd_*.go file's init, one file per command, so
// that commands can be added without touching this file.
var commands []*cli.Command

func register(c *cli.Command) { commands = append(commands, c) }

func newApp() *cli.App {
	sort.Slice(commands, func(i, j int) bool { return commands[i].Name < commands[j].Name })
	return &cli.App{
		Name:  "rafsnbd",
		Usage: "serve Nydus RAFS v6 (EROFS) images as block devices over NBD",
		Description: `rafsnbd builds RAFS v6 images (from a directory or a tar), inspects them,
composes an image's bootstrap and blobs into one flat EROFS block device,
exports that device to a disk file (optionally with a dm-verity hash tree),
and serves it over NBD, to the kernel (/dev/nbdN) or to network clients.

Typical flow:
  rafsnbd create -B image.boot -D blobs/ rootfs/
  rafsnbd export -B image.boot -D blobs/ -o image.disk --verity
  mount -t erofs -o loop,ro image.disk /mnt`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: []string{"RAFSNBD_LOG_LEVEL"}},
			&cli.BoolFlag{Name: "log-json", Usage: "log JSON lines instead of human-readable text"},
		},
		Before: func(c *cli.Context) error {
			level, err := zerolog.ParseLevel(c.String("log-level"))
			if err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			var logger zerolog.Logger
			if c.Bool("log-json") {
				logger = zerolog.New(os.Stderr)
			} else {
				logger = zerolog.New(zerolog.ConsoleWriter{
					Out: os.Stderr, TimeFormat: time.TimeOnly,
					NoColor: !term.IsTerminal(int(os.Stderr.Fd())),
				})
			}
			logger = logger.Level(level).With().Timestamp().Logger()
			c.Context = logger.WithContext(c.Context)
			return nil
		},
		Commands:             commands,
		EnableBashCompletion: true,
	}
}

// logger returns the command's logger, set up by the app's Before hook.
func logger(c *cli.Context) *zerolog.Logger { return zerolog.Ctx(c.Context) }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newApp().RunContext(ctx, os.Args); err != nil {
		fmt.Fprintf(os.Stderr, "rafsnbd: %v\n", err)
		os.Exit(1)
	}
}
