package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// runCmd runs `rafsnbd COMMAND ARGS...` in this process and returns what it
// printed (stdout and stderr together).
func runCmd(t *testing.T, command string, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	app := newApp()
	app.Writer = &out
	app.ErrWriter = &out
	err := app.Run(context.Background(), append([]string{"rafsnbd", command}, args...))
	return out.String(), err
}

// Without -D there is no blob directory to put the disk beside: export
// asks for -o instead of writing into the current directory.
func TestExportWithoutBlobDirWantsOutput(t *testing.T) {
	for _, args := range [][]string{
		{"--image", "example.com/app:1", "--cache-dir", t.TempDir()},
		{"-B", "image.boot", "--registry", "example.com/app", "--cache-dir", t.TempDir()},
	} {
		_, err := runCmd(t, "export", args...)
		if err == nil || !strings.Contains(err.Error(), "give -o FILE") {
			t.Errorf("export %v: %v, want a request for -o", args, err)
		}
	}
}
