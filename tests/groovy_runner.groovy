// Runs the tests' Groovy scripts one after another in one JVM, as QuPath runs its scripts in its own long-lived JVM
// (tests/test_groovy_scripts.py's groovy_run). A JVM started per script spent about 2.5 s starting and warming the
// compiler for each of some hundred scripts. Each request is one JSON line on stdin ({"script": path, "args": [...]});
// its script is compiled in a class loader of its own (classes a script declares never meet another's) and run on a
// thread of its own (an interrupt it leaves set does not reach the next), with System.out and System.err captured.
// The answer is one JSON line on the JVM's own stdout: the exit code GroovyMain would give (0, or 1 where the script
// threw, with GroovyMain's words), and what the script wrote to each stream. The stand-in classes on the classpath are compiled once, by this
// script's loader, the parent of every request's.
import groovy.json.JsonOutput
import groovy.json.JsonSlurper

def answers = new PrintStream(new FileOutputStream(FileDescriptor.out), true, "UTF-8")
def requests = new BufferedReader(new InputStreamReader(System.in, "UTF-8"))
def parent = this.class.classLoader
String line
while ((line = requests.readLine()) != null) {
    def request = new JsonSlurper().parseText(line)
    def out = new ByteArrayOutputStream()
    def err = new ByteArrayOutputStream()
    int rc = 0
    def saved = [System.out, System.err]
    System.setOut(new PrintStream(out, true, "UTF-8"))
    System.setErr(new PrintStream(err, true, "UTF-8"))
    def thread = new Thread({
        try {
            new GroovyShell(new GroovyClassLoader(parent)).run(new File(request.script), request.args as String[])
        } catch (Throwable t) {
            rc = 1  // and the words GroovyMain prints
            System.err.println("Caught: ${t}")
            org.codehaus.groovy.runtime.StackTraceUtils.deepSanitize(t).printStackTrace()
        }
    })
    try {
        thread.start()
        thread.join()
    } finally {
        System.setOut(saved[0])
        System.setErr(saved[1])
    }
    answers.println(JsonOutput.toJson([rc: rc, stdout: out.toString("UTF-8"), stderr: err.toString("UTF-8")]))
}
