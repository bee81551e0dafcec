// Command rafsnbd turns Nydus RAFS v6 images into block devices: it builds
// and inspects bootstraps, composes and exports flat EROFS disks with
// dm-verity trees, and serves them over NBD to the kernel or to network
// clients.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v3"
	"golang.org/x/term"
)

// commands is filled by each cmd_*.go file's init, one file per command, so
// that commands can be added without touching this file. They are
// constructors: urfave/cli v3 keeps parsed values in the flags themselves,
// so every run (and every in-process test) needs commands of its own.
var commands []func() *cli.Command

func register(newCommand func() *cli.Command) { commands = append(commands, newCommand) }

// Exit codes beyond 0 and 1 (a failed command), as the shells use them.
const (
	exitUsage       = 2   // a command line that cannot be run
	exitInterrupted = 130 // 128 + SIGINT: stopped by a signal
)

// usageError is a command line that cannot be run: one line on stderr and
// exit status 2, with a pointer to the command's --help.
type usageError struct {
	cmd string // "rafsnbd inspect"
	err error
}

func (e *usageError) Error() string {
	return fmt.Sprintf("%s: %v; see '%s --help'", e.cmd, e.err, e.cmd)
}

func (e *usageError) Unwrap() error { return e.err }

// usagef makes a usageError for cmd's command line.
func usagef(c *cli.Command, format string, args ...any) error {
	return &usageError{cmd: c.FullName(), err: fmt.Errorf(format, args...)}
}

func newApp() *cli.Command {
	cmds := make([]*cli.Command, len(commands))
	for i, newCommand := range commands {
		cmds[i] = newCommand()
		setUsageErrors(cmds[i])
	}
	slices.SortFunc(cmds, func(a, b *cli.Command) int { return strings.Compare(a.Name, b.Name) })
	return &cli.Command{
		Name:    "rafsnbd",
		Usage:   "serve Nydus RAFS v6 (EROFS) images as block devices over NBD",
		Version: version(),
		Description: `rafsnbd builds RAFS v6 images (from a directory or a tar), inspects them,
composes an image's bootstrap and blobs into one flat EROFS block device,
exports that device to a disk file (optionally with a dm-verity hash tree),
and serves it over NBD, to the kernel (/dev/nbdN) or to network clients.
Flags may come before or after a command's arguments.

Typical flow:
  rafsnbd create -B image.boot -D blobs/ rootfs/
  rafsnbd export -B image.boot -D blobs/ -o image.disk --verity
  mount -t erofs -o loop,ro image.disk /mnt`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "`LEVEL` of messages logged on stderr: debug, info, warn or error", Sources: cli.EnvVars("RAFSNBD_LOG_LEVEL")},
			&cli.BoolFlag{Name: "log-json", Usage: "log JSON lines instead of human-readable text (durations as strings with their unit, such as \"9.8ms\")"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress bars and no log lines but errors; results still go to stdout"},
		},
		Before: func(ctx context.Context, c *cli.Command) (context.Context, error) {
			level, err := parseLogLevel(c.String("log-level"))
			if err != nil {
				return ctx, usagef(c, "--log-level: %v", err)
			}
			quietProgress = c.Bool("quiet")
			if quietProgress {
				level = zerolog.ErrorLevel
			}
			// Durations print as durations with their unit ("9.8ms"), in
			// text and JSON alike, instead of unit-less milliseconds.
			zerolog.DurationFieldFormat = zerolog.DurationFormatString
			var logger zerolog.Logger
			out := c.Root().ErrWriter
			if c.Bool("log-json") {
				logger = zerolog.New(out)
			} else {
				tty := out == os.Stderr && term.IsTerminal(int(os.Stderr.Fd()))
				logger = zerolog.New(zerolog.ConsoleWriter{Out: out, TimeFormat: time.TimeOnly, NoColor: !tty})
			}
			logger = logger.Level(level).With().Timestamp().Logger()
			return logger.WithContext(ctx), nil
		},
		Commands:              cmds,
		EnableShellCompletion: true,
		Suggest:               true,
		OnUsageError:          onUsageError,
		CommandNotFound: func(_ context.Context, c *cli.Command, name string) {
			// Reported by run: the root command has no action of its own.
		},
		Action: func(ctx context.Context, c *cli.Command) error {
			if c.NArg() == 0 {
				return cli.ShowRootCommandHelp(c)
			}
			name := c.Args().First()
			msg := fmt.Sprintf("unknown command %q", name)
			if s := cli.SuggestCommand(c.Commands, name); s != "" && s != name {
				msg += fmt.Sprintf(" (did you mean %q?)", s)
			}
			return &usageError{cmd: "rafsnbd", err: errors.New(msg)}
		},
	}
}

// setUsageErrors makes every command report flag errors as usage errors.
func setUsageErrors(c *cli.Command) {
	c.OnUsageError = onUsageError
	for _, sub := range c.Commands {
		setUsageErrors(sub)
	}
}

// onUsageError turns a flag parsing error into one line instead of the
// whole help text.
func onUsageError(_ context.Context, c *cli.Command, err error, _ bool) error {
	return &usageError{cmd: c.FullName(), err: err}
}

// parseLogLevel accepts zerolog's level names and nothing else ("verbose"
// is refused instead of being logged as a warning).
func parseLogLevel(s string) (zerolog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return zerolog.DebugLevel, nil
	case "info", "":
		return zerolog.InfoLevel, nil
	case "warn", "warning":
		return zerolog.WarnLevel, nil
	case "error":
		return zerolog.ErrorLevel, nil
	}
	return 0, fmt.Errorf("unknown level %q: use debug, info, warn or error", s)
}

// version is the module version and VCS revision the binary was built from.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev != "" {
		if len(rev) > 12 {
			rev = rev[:12]
		}
		v += " " + rev + dirty
	}
	return v + " " + bi.GoVersion
}

// logger returns the command's logger, set up by the app's Before hook.
func logger(ctx context.Context) *zerolog.Logger { return zerolog.Ctx(ctx) }

// runMain runs the command line args and returns the exit status, printing
// errors on stderr in one line.
func runMain(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	app := newApp()
	app.Writer, app.ErrWriter = stdout, stderr
	// Run as a nydus-image symlink: the nydus-image command.
	args = nydusImageArgs(args)
	err := app.Run(ctx, args)
	if err == nil {
		return 0
	}
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, ue.Error())
		return exitUsage
	case ctx.Err() != nil && errors.Is(err, context.Canceled):
		fmt.Fprintln(stderr, "rafsnbd: interrupted")
		return exitInterrupted
	}
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		if msg := err.Error(); msg != "" {
			fmt.Fprintf(stderr, "rafsnbd: %s\n", msg)
		}
		return ec.ExitCode()
	}
	fmt.Fprintf(stderr, "rafsnbd: %v\n", err)
	return 1
}

func main() {
	// SIGHUP (the terminal went away) stops a command the way SIGTERM does,
	// so that serve removes its socket instead of dying with status 129.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	code := runMain(ctx, os.Args, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
