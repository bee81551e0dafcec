package main

import (
	"bytes"
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
	err := app.Run(append([]string{"rafsnbd", command}, args...))
	return out.String(), err
}
